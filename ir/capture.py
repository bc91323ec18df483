"""Turn an ``nn.Module`` into an ``fx.GraphModule`` that shares the model's parameters."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from torchgraft.ir.errors import CaptureError, quiet_fake_tensor_log
from torchgraft.ir.provenance import is_user_file, user_frame_from_text

Method = Literal["export", "symbolic_trace"]


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    method: Method = "export",
    strict: bool = False,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Capture ``model`` called with ``args`` / ``kwargs`` as an ``fx.GraphModule``.

    ``method="export"`` (default) uses ``torch.export.export`` and returns its ATen-level
    training graph (``aten.linear``, ``aten.scaled_dot_product_attention`` ... kept whole);
    ``method="symbolic_trace"`` gives a torch-level graph traced through every submodule
    (``torch._C._nn.linear``, ``torch.relu`` ...). Either way the graph module's parameters
    and buffers are the model's own objects under the same FQNs, so training through it
    updates ``model``, and every node has ``meta["val"]`` (a fake tensor),
    ``meta["nn_module_stack"]`` and ``meta["stack_trace"]``. The same tensor passed twice
    (``capture(m, (t, t))``) is captured as two independent inputs: ``torch.export`` would
    otherwise bake the alias into the graph and ignore the second argument forever after.

    Models as they ship (``transformers``): when ``model.forward`` takes a ``use_cache``
    argument (by name, or through ``**kwargs`` when ``model.config`` has ``use_cache``)
    that the call does not set, it is called with ``use_cache=False`` (a KV cache
    is an inference object: ``DynamicCache`` outputs cannot be captured) and the graph
    module is called without it, ``gm(input_ids)``. The graph returns what the model
    returns: a ``ModelOutput`` (``gm(ids).logits``), a dict, a tuple or a tensor.

    ``dynamic_shapes`` (export only) is passed to ``torch.export.export`` as it is, e.g.
    ``{"input_ids": {0: torch.export.Dim("batch")}}``: the graph then holds symbolic sizes,
    and every handler matches and rewrites it as usual (replacements are traced with the
    symbolic shapes). The fixed ``use_cache`` needs no entry.

    Example::

        gm = tg.capture(model, (tokens,))
        report = tg.PassManager(["float8"]).run(gm)
        loss = gm(tokens).sum(); loss.backward()   # gradients land on model's parameters
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    args, kwargs = _unaliased(args, dict(kwargs or {}))
    if method == "export":
        return _export(model, args, kwargs, strict, dynamic_shapes)
    if dynamic_shapes is not None:
        raise ValueError("dynamic_shapes is a torch.export option: use method='export'")
    if method == "symbolic_trace":
        return _symbolic_trace(model, args, kwargs)
    raise ValueError(f"unknown capture method {method!r}; use 'export' or 'symbolic_trace'")


def _unaliased(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Clone every tensor that was already passed as an earlier argument."""
    seen: set[int] = set()

    def fresh(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            return value.clone()
        seen.add(id(value))
        return value

    args = tuple(fresh(a) for a in args)
    return args, {k: fresh(v) for k, v in kwargs.items()}


FIXED_KWARGS = {"use_cache": False}
"""Keyword arguments set at capture when ``forward`` takes them and the call does not:
``use_cache=False`` makes ``transformers`` models return no KV cache. ``forward`` takes one
when it names it, or passes ``**kwargs`` on and the model's ``config`` has that setting
(transformers' GraniteMoE reads ``use_cache`` from its ``**kwargs``)."""


def _fixed_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    config = getattr(model, "config", None)

    def takes(name: str) -> bool:
        return name in params or (passes_on and getattr(config, name, None) is not None)

    return {k: v for k, v in FIXED_KWARGS.items() if k not in kwargs and takes(k)}


def _export(
    model: nn.Module, args: tuple, kwargs: dict, strict: bool, dynamic_shapes: Any
) -> fx.GraphModule:
    fixed = _fixed_kwargs(model, kwargs)
    if fixed and isinstance(dynamic_shapes, Mapping):
        dynamic_shapes = {**dynamic_shapes, **dict.fromkeys(fixed)}
    elif fixed and isinstance(dynamic_shapes, (tuple, list)):
        dynamic_shapes = (*dynamic_shapes, *(None for _ in fixed))
    try:
        with quiet_fake_tensor_log():  # the CaptureError says what failed
            program = torch.export.export(
                model, args, {**kwargs, **fixed}, strict=strict, dynamic_shapes=dynamic_shapes
            )
    except Exception as exc:
        raise _capture_error(model, "torch.export", exc, _export_hint(exc)) from exc
    if not fixed:
        return program.module()
    # The guard function export inserts would take the dropped inputs: input checks are
    # left to the module's pre-forward hook (shapes against the range constraints).
    gm = program.module(check_guards=False)
    _drop_inputs(gm, args, kwargs, fixed)
    return gm


def _drop_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict, fixed: dict) -> None:
    """Remove the constant inputs ``fixed`` from the graph module's calling convention, so
    that it is called with ``args`` / ``kwargs`` alone (export specializes constants: their
    placeholders have no users)."""
    for node in list(gm.graph.find_nodes(op="placeholder")):
        if node.target in fixed:
            if node.users:  # a constant export did not specialize: keep the model as it is
                raise CaptureError(
                    f"torch.export kept {node.target}={fixed[node.target]!r} as a graph input; "
                    f"pass it explicitly: tg.capture(model, args, {{{node.target!r}: ...}})"
                )
            gm.graph.erase_node(node)
    info = gm.graph._codegen.pytree_info
    in_spec = pytree.tree_structure((args, kwargs))
    names = [name for name in info.orig_args if name not in fixed]
    gm.graph._codegen.pytree_info = info._replace(orig_args=names, in_spec=in_spec)
    gm._in_spec = in_spec
    gm.recompile()


class _ThroughModules(fx.Tracer):
    """Traces into every submodule so the graph holds functions, not module calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    tracer = _ThroughModules()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
        bound = dict(zip(placeholders, args))
        bound.update(kwargs)
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(
            *(bound[name] for name in placeholders if name in bound)
        )
    except Exception as exc:
        raise _capture_error(
            model, "torch.fx.symbolic_trace", exc, "try tg.capture(model, args, method='export')"
        ) from exc
    return gm


def _capture_error(model: nn.Module, tool: str, exc: Exception, hint: str) -> CaptureError:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if is_user_file(f.filename)]
    if frames:
        frame = frames[-1]
        where = f"{frame.filename}:{frame.lineno}: {frame.line}"
    else:
        where = user_frame_from_text(str(exc))
    headline = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = f"{tool} could not capture {type(model).__name__}: {type(exc).__name__}: {headline}"
    if where:
        message += f"\n  failing source line: {where}"
    message += f"\n  hint: {hint}"
    return CaptureError(message)


def _export_hint(exc: Exception) -> str:
    """What to change when ``torch.export`` fails, from what its message says."""
    text = str(exc)
    if (
        "in output, which is not a known type" in text
        or "in input, which is not a known type" in text
    ):
        return (
            "the model takes or returns an object torch.export cannot flatten (e.g. a KV "
            "cache); return tensors, a dict or a ModelOutput (transformers: use_cache=False), "
            "or register the type with torch.utils._pytree.register_pytree_node"
        )
    if "dynamic_shapes" in text or "Constraints violated" in text:
        return (
            "a size declared dynamic in dynamic_shapes is specialized by the model; follow "
            "torch.export's suggested fixes above or keep that dimension static"
        )
    return "try tg.capture(model, args, method='symbolic_trace')"
