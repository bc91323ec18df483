"""Run configs: one YAML file names the model, how to capture it and the handler plan.

Schema (every key but ``model`` is optional; unknown keys and wrong types are errors that
give ``file:line:column``)::

    imports: [my_project.handlers]      # modules imported first, so their handlers register
    model:
      factory: "torchgraft.models:build_llama"   # "module:callable" returning an nn.Module
      kwargs: {preset: tiny}                     # keyword arguments of the factory
      inputs:                                    # one example input per forward argument
        - {shape: [2, 32], dtype: int64, high: 256}   # integers in [0, high)
    capture: {method: export, strict: false}     # or method: symbolic_trace; dynamic_batch
    handlers:                                    # the plan, in order
      - fuse_rms_norm                            # a name
      - float8: {recipe: rowwise}                # {name: {option: value}}
      - flex_attention: {optional: true}         # reserved key: may match nothing
    verify: true                                 # torchgraft run verifies numerics
    allow: [overlap]                             # problem kinds this plan accepts
    parallel: {tp: 1, fsdp: false, plan: {}}
    compile: {enabled: false}
    train: {steps: 100, lr: 3.0e-4, compare_baseline: false}   # batch 2 x 32: model.inputs
    output: {dir: runs}

The batch shape is said once: ``train.batch_size`` / ``train.seq_len`` default to the
``[batch, seq]`` of an integer ``model.inputs[0]`` (else 8 x 128), ``model.inputs`` may be
omitted (the ``train`` batch: tokens, plus labels when ``forward`` requires two
arguments), and stating both differently is an error naming both lines.

The file is read with PyYAML's safe loader: no tag can construct a Python object. A config
runs code only by importing the modules listed in ``imports`` and ``model.factory`` and by
calling that factory; both are imported with the working directory and the config's
directory appended to the *end* of ``sys.path`` (so a file next to the config never shadows
an installed module). Values nest at most :data:`MAX_DEPTH` levels and expand (YAML aliases
included) to at most :data:`MAX_VALUES` items. Handler options are checked by the handlers themselves: a bad
one is a ``bad_option`` problem of the plan (quoting its config line), not a config error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import math
import sys
import types
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import fx, nn

from torchgraft.handlers.options import conforms, shown, type_name
from torchgraft.ir.capture import capture
from torchgraft.ir.dynamic_batch import batch_dynamic_shapes, has_dynamic_batch
from torchgraft.ir.errors import CaptureError, TorchgraftError
from torchgraft.passes import CheckResult, HandlerEntry, PassManager
from torchgraft.passes.parallelize import DEFAULT_INIT_TIMEOUT_S, DEFAULT_TRAIN_TIMEOUT_S
from torchgraft.passes.problems import allowed_kinds
from torchgraft.train.config import FieldError, TrainConfig
from torchgraft.train.lm import (
    BYTE_VOCAB,
    UnsupportedModelError,
    as_trained,
    check_scalar_loss,
    takes_labels,
)

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings a config may have."""
MAX_VALUES = 100_000
"""Most items one value may expand to (a guard against YAML alias bombs)."""
MAX_INPUT_ELEMENTS = 2**28
"""Most elements of one example input (1 GiB of float32)."""


class ConfigError(TorchgraftError):
    """A config cannot be read, validated or acted on; the message starts with its location."""

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputSpec:
    """One example input of the model's forward, made of random values."""

    shape: tuple[int, ...]
    """Tensor shape, e.g. ``[2, 32]``."""
    dtype: str = "float32"
    """A torch dtype name: ``float32``, ``bfloat16``, ``int64`` ..."""
    high: int | None = None
    """Integer inputs are uniform in ``[0, high)`` (e.g. the vocabulary size); required for them."""

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}; use e.g. float32, bfloat16, int64")
        if any(d < 0 for d in self.shape):
            raise FieldError("inputs", "shape", f"{list(self.shape)} has a negative dimension")
        if math.prod(self.shape) > MAX_INPUT_ELEMENTS:
            raise FieldError(
                "inputs",
                "shape",
                f"{list(self.shape)} has more than {MAX_INPUT_ELEMENTS:,} elements; use a "
                "small example batch",
            )
        integer = not (self.torch_dtype.is_floating_point or self.torch_dtype == torch.bool)
        if integer and (self.high is None or self.high < 1):
            raise ValueError(f"{self.dtype} inputs need high >= 1 (values are drawn in [0, high))")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def make(self, generator: torch.Generator) -> torch.Tensor:
        """A random tensor of this spec."""
        if self.torch_dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator, dtype=self.torch_dtype)
        if self.torch_dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        return torch.randint(0, self.high, self.shape, generator=generator, dtype=self.torch_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to build and what to call it with."""

    factory: str
    """``"module:callable"`` returning the ``nn.Module``, e.g. ``"torchgraft.models:build_llama"``."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the factory."""
    inputs: tuple[InputSpec, ...] = ()
    """One example input per positional argument of the model's forward."""

    def __post_init__(self) -> None:
        module, _, attribute = self.factory.partition(":")
        if not module or not attribute:
            raise ValueError(f"factory must be 'module:callable', got {self.factory!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """Arguments of :func:`torchgraft.capture`."""

    method: Literal["export", "symbolic_trace"] = "export"
    """``export`` (ATen training IR) or ``symbolic_trace`` (torch-level graph)."""
    strict: bool = False
    """Strict-mode ``torch.export``."""
    dynamic_batch: bool | None = None
    """Capture dim 0 of every input (the batch) as dynamic, so the trained graph takes any
    batch size (a last partial batch, an eval batch): ``true`` requires it (an error if the
    model's code fixes the batch size, or with joint-stage handlers, whose step is traced at
    one shape), ``false`` bakes the example's batch size in, unset (default) makes it
    dynamic where the model and the plan allow it. ``method: export`` only."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Tensor parallelism and FSDP2, applied after the handlers (ranks from ``torchrun``)."""

    tp: int = 1
    """Tensor-parallel degree; 1 disables tensor parallelism."""
    fsdp: bool | int = False
    """FSDP2 (``fully_shard`` per transformer block): ``true`` uses every rank not taken by
    ``tp`` as a data-parallel rank, an integer is the data-parallel degree."""
    plan: dict[str, str] = dataclasses.field(default_factory=dict)
    """Module FQN glob → ``colwise`` | ``rowwise`` | ``replicate`` (e.g.
    ``"layers.*.attention.wq": colwise``); empty: the built-in Llama's plan."""
    sequence_parallel: bool = True
    """Keep activations between tensor-parallel regions sharded along the tokens (float8
    linears then gather their inputs as float8)."""
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S
    """Seconds a collective may wait for the other ranks until the first training step is
    done (joining, sharding, compiling): a hung rank ends the job after this long."""
    train_timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S
    """Seconds a collective may wait for the other ranks during training."""

    def __post_init__(self) -> None:
        for name in ("init_timeout_s", "train_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise FieldError(
                    "parallel", name, f"must be > 0 seconds, got {getattr(self, name)}"
                )
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if not isinstance(self.fsdp, bool) and self.fsdp < 1:
            raise ValueError(f"fsdp must be true, false or a degree >= 1, got {self.fsdp}")

    @property
    def enabled(self) -> bool:
        """Whether the parallelize stage runs."""
        return self.tp > 1 or bool(self.fsdp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """``torch.compile`` of the rewritten model."""

    enabled: bool = False
    """Compile the rewritten graph module before training."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection(TrainConfig):
    """The ``train`` section: every :class:`torchgraft.train.TrainConfig` field, plus
    ``compare_baseline``."""

    compare_baseline: bool = False
    """Also train the unconverted model with the same seed and data, and compare losses."""

    def to_train_config(self) -> TrainConfig:
        """The :class:`~torchgraft.train.TrainConfig` of this section."""
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        return TrainConfig(**{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where a run writes its artifacts."""

    dir: str = "runs"
    """Output directory (relative paths are relative to the working directory)."""


_INTERNAL = {"internal": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A validated run config. Read one with :func:`load_config`."""

    imports: tuple[str, ...] = ()
    """Modules to import before anything else, so the handlers they define register."""
    model: ModelConfig
    capture: CaptureConfig = CaptureConfig()
    handlers: tuple[HandlerEntry, ...] = ()
    """The plan: a handler name or ``{name: {option: value, optional: bool}}`` per item."""
    verify: bool = True
    """Whether ``torchgraft run`` verifies numerics (``torchgraft check`` always does)."""
    allow: tuple[str, ...] = ()
    """Problem kinds this plan accepts (``overlap``, ``order``, ``no_match``, ``clobber``,
    ``numerics`` ...): reported, but ``check`` still exits 0 and ``run`` still trains."""
    parallel: ParallelConfig = ParallelConfig()
    compile: CompileConfig = CompileConfig()
    train: TrainSection = TrainSection()
    output: OutputConfig = OutputConfig()
    path: Path | None = dataclasses.field(default=None, metadata=_INTERNAL)
    """The file the config was read from."""
    locations: Mapping[str, str] = dataclasses.field(default_factory=dict, metadata=_INTERNAL)
    """Key path (``model.factory``, ``imports[0]``) → ``file:line:col`` where it was written."""

    def import_modules(self) -> None:
        """Import the modules of ``imports``; a failure is a :class:`ConfigError`."""
        for i, module in enumerate(self.imports):
            self._import(module, f"imports[{i}]")

    def build_model(self) -> nn.Module:
        """Call ``model.factory`` with ``model.kwargs``."""
        module_name, _, attribute = self.model.factory.partition(":")
        where = self.locations.get("model.factory")
        target: Any = self._import(module_name, "model.factory")
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ConfigError(
                    f"model.factory: {module_name} has no attribute {attribute!r}", where
                )
            target = getattr(target, part)
        if not callable(target):
            raise ConfigError(f"model.factory: {self.model.factory} is not callable", where)
        try:
            model = target(**self.model.kwargs)
        except (Exception, SystemExit) as exc:  # the user's factory, called with the user's kwargs
            raise ConfigError(
                f"model.factory: {self.model.factory}(**{shown(self.model.kwargs)}) raised "
                f"{type(exc).__name__}: {shown(str(exc))[1:-1]}",
                where,
            ) from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model.factory: {self.model.factory} returned {type(model).__name__}, not an nn.Module",
                where,
            )
        return model

    def example_inputs(
        self, seed: int = 0, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Random tensors following ``model.inputs``, or when it is omitted and ``model`` is
        given, one training batch of it (:meth:`batch_specs`)."""
        specs = self.model.inputs or (self.batch_specs(model) if model is not None else ())
        if not specs:
            raise ConfigError(
                "model.inputs is empty: give one {shape, dtype, high} per forward argument",
                self.locations.get("model"),
            )
        generator = torch.Generator().manual_seed(seed)
        return tuple(spec.make(generator) for spec in specs)

    def batch_specs(self, model: nn.Module) -> tuple[InputSpec, ...]:
        """``model.inputs``, or when omitted, the training batch ``[train.batch_size,
        train.seq_len]`` of byte tokens: ``(tokens, labels)`` if ``model.forward`` requires
        two arguments, else ``(tokens,)``."""
        if self.model.inputs:
            return self.model.inputs
        tokens = InputSpec(
            shape=(self.train.batch_size, self.train.seq_len), dtype="int64", high=BYTE_VOCAB
        )
        return (tokens, tokens) if takes_labels(model) else (tokens,)

    def dynamic_batch(self, stages: Collection[str]) -> bool:
        """Whether ``run`` captures the batch dimension as dynamic, for a plan using
        ``stages``: ``capture.dynamic_batch``, or when unset, with ``method: export`` unless
        a handler runs at stage ``joint``. ``true`` where it cannot work is a
        :class:`ConfigError` naming the key."""
        stated = self.capture.dynamic_batch
        where = self.locations.get("capture.dynamic_batch")
        if stated is None:
            return self.capture.method == "export" and "joint" not in stages
        if stated and self.capture.method != "export":
            raise ConfigError(
                "capture.dynamic_batch: true needs capture.method: export (a symbolically "
                "traced graph has the sizes the model's code gives it); drop the key",
                where,
            )
        if stated and "joint" in stages:
            raise ConfigError(
                "capture.dynamic_batch: true cannot be combined with handlers at stage 'joint' "
                "(their training step is traced at one batch shape); set it to false or drop it",
                where,
            )
        return stated

    def capture_model(
        self, model: nn.Module, inputs: Sequence[torch.Tensor], *, dynamic_batch: bool = False
    ) -> fx.GraphModule:
        """:func:`torchgraft.capture` as the ``capture`` section says, with dim 0 of every
        input dynamic where the model allows it if ``dynamic_batch``
        (:func:`~torchgraft.ir.dynamic_batch.batch_dynamic_shapes`; a graph that got a static
        batch is a :class:`ConfigError` when ``capture.dynamic_batch`` is ``true``); a model
        torch cannot turn into Python code (a submodule named ``a"b``) is a
        :class:`ConfigError`."""
        shapes = batch_dynamic_shapes(inputs) if dynamic_batch else None
        try:
            gm = capture(
                model,
                tuple(inputs),
                method=self.capture.method,
                strict=self.capture.strict,
                dynamic_shapes=shapes,
            )
        except CaptureError as exc:  # its source line and hint, on the one line
            message = "; ".join(line.strip() for line in str(exc).splitlines())
            raise ConfigError(f"model: {message}", self.locations.get("model")) from None
        except SyntaxError as exc:
            raise ConfigError(
                f"model: the captured graph's code does not compile ({exc.msg}: "
                f"{shown(exc.text or '')}); give submodules and parameters identifier names",
                self.locations.get("model.factory"),
            ) from None
        if dynamic_batch and self.capture.dynamic_batch and not has_dynamic_batch(gm):
            raise ConfigError(
                f"capture.dynamic_batch: {type(model).__name__} fixes the batch size of its "
                f"inputs {[list(t.shape) for t in inputs]} (its code, or an example batch of "
                "1 row, specializes dim 0); set it to false or drop it",
                self.locations.get("capture.dynamic_batch"),
            )
        return gm

    def pass_manager(self, inputs: Sequence[torch.Tensor] | None = None) -> PassManager:
        """The :class:`PassManager` of the plan (verifying when ``verify`` is set)."""
        return PassManager(list(self.handlers), verify=self.verify, inputs=inputs, allow=self.allow)

    def check(self) -> CheckResult:
        """What ``torchgraft check`` does: import, build the model, and unless the plan
        itself has problems, run the module stage on it, capture and dry-run every check
        (numerics always verified) on the graph ``torchgraft run`` would train
        (:meth:`judged_graph`); a plan with joint-stage handlers also traces one joint step
        of the converted graph, one with compile-stage handlers (and none at the joint
        stage, which ``run`` cannot combine with compiling) compiles one forward + backward
        step with them (:func:`~torchgraft.passes.compile_capture.capture_compile`); their
        matches and problems are added."""
        self.import_modules()
        model = self.build_model()
        pm = self.pass_manager()
        if pm.problems:
            return CheckResult(pm.order, list(pm.problems))
        module_report = pm.convert_module(model)  # the module stage runs before capture
        gm, inputs = self.judged_graph(model, dynamic_batch=self.dynamic_batch(pm.stages))
        result = pm.dry_run(gm, inputs)
        result.problems[:0] = module_report.problems
        if result.report is not None:
            result.report.merge(dataclasses.replace(module_report, problems=[]))
            if "joint" in pm.stages and result.ok:  # trace one joint step of the converted graph
                from torchgraft.passes.joint import check_joint

                # dry_run rewrote a copy: gm is still the capture, converted here in place
                joint_report = check_joint(pm, gm, inputs)
                result.problems += joint_report.problems
                result.report.merge(dataclasses.replace(joint_report, problems=[]))
            elif "compile" in pm.stages and result.ok:  # compile one step of the converted graph
                from torchgraft.passes.compile_capture import check_compile

                compile_report = check_compile(pm, gm, inputs)
                found = compile_report.problems
                result.problems += [p for p in found if p.kind not in pm.allow]
                result.allowed += [p for p in found if p.kind in pm.allow]
                result.report.merge(dataclasses.replace(compile_report, problems=[]))
        return result

    def judged_graph(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...] | None = None,
        *,
        strict: bool = False,
        dynamic_batch: bool = False,
    ) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
        """The captured graph ``torchgraft run`` trains and ``check``, ``viz`` and ``explain``
        judge, with its inputs (default: :meth:`example_inputs`): a causal LM's
        ``forward(tokens)`` with the next-token loss added, or a ``forward(tokens, labels)``
        loss model as it is (:func:`~torchgraft.train.lm.as_trained`). Any other model is
        taken as it is, or with ``strict`` (``run``) refused with a :class:`ConfigError`
        saying what ``run`` supports. ``dynamic_batch``: see :meth:`capture_model`."""
        if inputs is None:
            inputs = self.example_inputs(model=model)
        where = self.locations.get("model.inputs") or self.locations.get("model")
        try:
            module, trained = as_trained(model, inputs)
        except UnsupportedModelError as exc:
            if strict:
                raise ConfigError(str(exc), where) from None
            return self.capture_model(model, inputs, dynamic_batch=dynamic_batch), inputs
        gm = self.capture_model(module, trained, dynamic_batch=dynamic_batch)
        if strict:
            try:
                check_scalar_loss(gm)
            except UnsupportedModelError as exc:
                raise ConfigError(str(exc), where) from None
        return gm, trained

    def _import(self, module: str, key: str) -> types.ModuleType:
        with self._search_path():
            try:
                return importlib.import_module(module)
            except (Exception, SystemExit) as exc:  # ImportError, or what the module raises
                raise ConfigError(
                    f"{key}: cannot import {module!r}: {type(exc).__name__}: {shown(str(exc))[1:-1]}",
                    self.locations.get(key),
                ) from exc

    @contextlib.contextmanager
    def _search_path(self) -> Iterator[None]:
        """The working directory, then the config's, appended to ``sys.path`` (last, so
        they never shadow an installed module)."""
        extra = [str(Path.cwd())]
        if self.path is not None:
            extra.append(str(self.path.resolve().parent))
        added = list(dict.fromkeys(p for p in extra if p not in sys.path))
        sys.path.extend(added)
        try:
            yield
        finally:
            for p in added:
                sys.path.remove(p)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML run config; raises :class:`ConfigError` with the location."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {shown(str(exc))[1:-1]}") from None
    return parse_config(text, path)


def parse_config(text: str, path: str | Path = "<config>") -> Config:
    """Validate the YAML ``text`` of a run config read from ``path``."""
    return _settled(_Reader(text, Path(path)).config())


def _settled(config: Config) -> Config:
    """Checks across sections, with the locations of what they compare: every ``allow``
    item is an acceptable problem kind, and the batch shape is said once —
    ``train.batch_size`` / ``train.seq_len`` default to the ``[batch, seq]`` of an integer
    ``model.inputs[0]``, and a config stating both differently is an error naming both."""
    for i, kind in enumerate(config.allow):
        try:
            allowed_kinds([kind])
        except TorchgraftError as exc:
            raise ConfigError(str(exc), config.locations.get(f"allow[{i}]")) from None
    inputs = config.model.inputs
    if not inputs or len(inputs[0].shape) != 2 or inputs[0].torch_dtype.is_floating_point:
        return config
    where = config.locations.get("model.inputs[0].shape") or config.locations.get("model.inputs")
    derived = {}
    for name, value in zip(("batch_size", "seq_len"), inputs[0].shape):
        key = f"train.{name}"
        stated = getattr(config.train, name)
        if key not in config.locations:
            derived[name] = value
        elif stated != value:
            raise ConfigError(
                f"{key} is {stated} but model.inputs[0] has shape {list(inputs[0].shape)} "
                f"(at {where}): say the batch shape once, in model.inputs or in train",
                config.locations[key],
            )
    if not derived:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **derived))


class _Reader:
    """Turns the composed YAML node tree into the config dataclasses, checking each value
    against the field's type and remembering where it was written."""

    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.loader = yaml.SafeLoader(text)
        self.path = path
        self.locations: dict[str, str] = {}

    def where(self, node: yaml.Node) -> str:
        mark = node.start_mark
        return f"{self.path}:{mark.line + 1}:{mark.column + 1}"

    def error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(message, self.where(node))

    def config(self) -> Config:
        try:
            self.check_depth()
            root = self.loader.get_single_node()
            if root is None:
                raise ConfigError(
                    "the config is empty; it needs at least a model section", str(self.path)
                )
            return self.instance(root, Config, "", path=self.path, locations=self.locations)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            location = f"{self.path}:{mark.line + 1}:{mark.column + 1}" if mark else str(self.path)
            context = f" ({exc.context})" if exc.context else ""
            raise ConfigError(f"invalid YAML: {exc.problem}{context}", location) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", str(self.path)) from None
        finally:
            self.loader.dispose()

    def check_depth(self) -> None:
        """Refuse nesting deeper than :data:`MAX_DEPTH` before composing (which recurses)."""
        depth = 0
        for event in yaml.parse(self.text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    mark = event.start_mark
                    raise ConfigError(
                        f"values nest more than {MAX_DEPTH} levels deep",
                        f"{self.path}:{mark.line + 1}:{mark.column + 1}",
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1

    def construct(self, node: yaml.Node, key: str) -> Any:
        """The plain value of ``node``, refused if it expands to more than :data:`MAX_VALUES`
        items (aliases count each time they are used)."""
        if _expanded_size(node, {}) > MAX_VALUES:
            raise self.error(
                node, f"{key}: the value expands to more than {MAX_VALUES:,} items (YAML aliases)"
            )
        return self.loader.construct_object(node, deep=True)

    def mapping_items(self, node: yaml.MappingNode, key: str) -> list[tuple[yaml.Node, yaml.Node]]:
        """``(key, value)`` nodes of a mapping, YAML merge keys (``<<: *x``) applied; every
        key must be a string."""
        self.loader.flatten_mapping(node)
        for key_node, _ in node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                raise self.error(
                    key_node,
                    f"{key or 'the config'}: keys must be strings, got {_shown(self.loader, key_node)}",
                )
        return node.value

    def read(self, node: yaml.Node, tp: Any, key: str) -> Any:
        self.locations[key] = self.where(node)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return self.construct(node, key)
        if tp is HandlerEntry:
            return self.handler(node, key)
        if dataclasses.is_dataclass(tp):
            return self.instance(node, tp, key)
        if origin in (typing.Union, types.UnionType):
            return self.union(node, tp, args, key)
        if origin in (list, tuple, Sequence):
            return self.sequence(node, tp, args, key)
        if origin in (dict, Mapping):
            if not isinstance(node, yaml.MappingNode):
                raise self.error(node, f"{key}: expected a mapping, got {_kind(node)}")
            return {
                self.read(k, args[0], f"{key}.{k.value}"): self.read(v, args[1], f"{key}.{k.value}")
                for k, v in self.mapping_items(node, key)
            }
        if not isinstance(node, yaml.ScalarNode) or not conforms(
            value := self.loader.construct_object(node), tp
        ):
            raise self.error(
                node, f"{key}: expected {type_name(tp)}, got {_shown(self.loader, node)}"
            )
        return float(value) if tp is float else value

    def instance(self, node: yaml.Node, cls: type, key: str, **extra: Any) -> Any:
        """Dataclass ``cls`` from mapping ``node`` (plus ``extra`` non-YAML fields)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        section = key or "the config"
        if not isinstance(node, yaml.MappingNode):
            raise self.error(
                node,
                f"{section}: expected a mapping with keys {', '.join(fields)}, got {_kind(node)}",
            )
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key_node, value_node in self.mapping_items(node, key):
            name = key_node.value
            if name not in fields:
                close = difflib.get_close_matches(str(name), fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    key_node,
                    f"unknown key {name!r} in {section}{hint} (known keys: {', '.join(fields)})",
                )
            if name in values:
                raise self.error(key_node, f"key {name!r} appears twice in {section}")
            values[name] = self.read(value_node, hints[name], f"{key}.{name}".lstrip("."))
        missing = [
            name
            for name, f in fields.items()
            if name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise self.error(node, f"{section}: missing required key {missing[0]!r}")
        try:  # the dataclass's own validation, reported at its node (or its field's)
            return cls(**values, **extra)
        except FieldError as exc:
            field = f"{key}.{exc.field}".lstrip(".")
            location = self.locations.get(field, self.where(node))
            raise ConfigError(f"{field}: {exc.reason}", location) from None
        except (ValueError, TypeError) as exc:
            raise self.error(node, f"{section}: {exc}") from None

    def union(self, node: yaml.Node, tp: Any, args: tuple, key: str) -> Any:
        if type(None) in args and _is_null(node):
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # an optional value: its own error is the clearest
            return self.read(node, alternatives[0], key)
        for alternative in alternatives:
            try:
                return self.read(node, alternative, key)
            except ConfigError:
                continue
        raise self.error(node, f"{key}: expected {type_name(tp)}, got {_shown(self.loader, node)}")

    def sequence(self, node: yaml.Node, tp: Any, args: tuple, key: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"{key}: expected a list, got {_shown(self.loader, node)}")
        items = node.value
        if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise self.error(node, f"{key}: expected {len(args)} items, got {len(items)}")
            return tuple(
                self.read(n, a, f"{key}[{i}]") for i, (n, a) in enumerate(zip(items, args))
            )
        item = args[0] if args else Any
        values = [self.read(n, item, f"{key}[{i}]") for i, n in enumerate(items)]
        return tuple(values) if typing.get_origin(tp) is tuple else values

    def handler(self, node: yaml.Node, key: str) -> HandlerEntry:
        """A plan item: ``name`` or ``{name: {option: value}}`` (``optional`` reserved)."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            return HandlerEntry(node.value, source=self.where(node))
        if not (isinstance(node, yaml.MappingNode) and len(node.value) == 1):
            raise self.error(
                node,
                f"{key}: a handler is a name or {{name: {{option: value}}}}, got {_shown(self.loader, node)}",
            )
        ((name_node, options_node),) = self.mapping_items(node, key)
        if _is_null(options_node):
            return HandlerEntry(name_node.value, source=self.where(name_node))
        if not isinstance(options_node, yaml.MappingNode):
            raise self.error(
                options_node, f"{key}: the options of handler {name_node.value!r} must be a mapping"
            )
        options, sources, optional = {}, {}, False
        for option_node, value_node in self.mapping_items(options_node, key):
            option = option_node.value
            if option == "optional":
                optional = self.read(value_node, bool, f"{key}.{name_node.value}.optional")
                continue
            options[option] = self.construct(value_node, f"{key}.{name_node.value}.{option}")
            sources[option] = self.where(option_node)
        return HandlerEntry(name_node.value, options, optional, self.where(name_node), sources)


_STR_TAG = "tag:yaml.org,2002:str"


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Items ``node`` expands to, each shared (aliased) node counted at every use;
    ``sizes`` memoizes by node, so the count takes time linear in the distinct nodes."""
    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a value")


def _shown(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return shown(loader.construct_object(node))
    return _kind(node)
