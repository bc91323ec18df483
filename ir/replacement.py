"""Trace a rule's replacement into a template graph, using the matched values' shapes.

Tensor parameters become proxies whose ``.shape``, ``.dtype``, ``.size()`` ... are the
matched node's fake tensor, so a replacement may branch on shapes. Every traced op is run
on fake tensors as it is recorded (a custom op on meta tensors where that is faithful: see
:mod:`torchgraft.ir.meta_run`), which gives the new nodes their ``meta["val"]``.
Templates are cached per signature (the inputs' shapes, dtypes, literal values and the
matched outputs' shapes and dtypes, which a template is checked against when traced): a
trace costs 0.6-2 ms, and a model repeats the same signatures.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import dis
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn, sym_not
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensor,
)
from torch.fx.experimental.symbolic_shapes import ShapeEnv, statically_known_true, sym_eq
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_map_only

from torchgraft.ir.errors import RuleDefinitionError, quiet_fake_tensor_log
from torchgraft.ir.leaf import is_leaf, leaf_fake, patched_fx_wraps
from torchgraft.ir.meta_run import NOT_RUN, fake_from_meta, meta_like, run_on_meta
from torchgraft.ir.rule import Match, Rule
from torchgraft.ir.state import BOUND_NODE, NEW_ATTRIBUTE, NewAttribute, tracing


class ShapedProxy(fx.Proxy):
    """A proxy that answers shape questions from its node's fake value."""

    @property
    def val(self) -> Any:
        return self.node.meta["val"]

    @property
    def shape(self) -> torch.Size:
        return self.val.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.val.dtype

    @property
    def device(self) -> torch.device:
        return self.val.device

    @property
    def ndim(self) -> int:
        return self.val.ndim

    def size(self, dim: int | None = None) -> Any:
        return self.val.size() if dim is None else self.val.size(dim)

    def dim(self) -> int:
        return self.val.dim()

    def numel(self) -> int:
        return self.val.numel()

    def __len__(self) -> int:
        return len(self.val)

    def __iter__(self):
        val = self.node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return (self[i] for i in range(len(val)))
        count = _unpack_count(inspect.currentframe().f_back)
        if "val" not in self.node.meta and count is not None:
            return (self[i] for i in range(count))  # a leaf's result of unknown arity
        return super().__iter__()


def _lacks_val(value: Any) -> bool:
    return isinstance(value, fx.Node) and "val" not in value.meta


def _unpack_count(frame: Any) -> int | None:
    """How many values the code at ``frame`` unpacks right now (``a, b = proxy``), if it does."""
    instructions = list(dis.get_instructions(frame.f_code))
    i = bisect.bisect_left(instructions, frame.f_lasti, key=lambda inst: inst.offset)
    if i < len(instructions) and instructions[i].opname == "UNPACK_SEQUENCE":
        return instructions[i].argval
    return None


class _Tracer(fx.Tracer):
    def __init__(self, fake_mode: Any) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.tensor_attrs: dict = {}
        self.fake_mode = fake_mode
        self.per_match = False
        """Set when the replacement creates state or reads values: do not reuse its template."""
        self.attribute_names: dict[int, str] = {}

    def proxy(self, node: fx.Node) -> ShapedProxy:
        return ShapedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        if kind == "get_attr":
            raise RuleDefinitionError(
                "a replacement may not read module attributes; create state with "
                "tg.new_parameter / tg.new_buffer / tg.new_constant"
            )
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "call_function" and is_leaf(target):
            fake = leaf_fake(target)
            if fake is not None:  # a leaf without one gets no meta["val"]
                node.meta["val"] = self._run_fake(node, fake)
        elif target is operator.getitem and _lacks_val(args[0]):
            pass  # an item of such a leaf's result: unknown too
        elif kind in ("call_function", "call_method"):
            node.meta["val"] = self._run_fake(node)
        return node

    def create_arg(self, a: Any) -> Any:
        # A tensor the replacement uses becomes state of the match: a tensor of the
        # replacement module under its own name (shared by every match), a tensor created
        # while tracing as new state of this match.
        if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor):
            kind = "parameter" if isinstance(a, nn.Parameter) else "constant"
            owned = self.attribute_names.get(id(a))
            if owned is not None:
                return self.new_attribute(NewAttribute(owned, kind, a), per_match=False).node
            name = "param" if kind == "parameter" else "_tensor_constant"
            return self.new_attribute(NewAttribute(name, kind, a)).node
        return super().create_arg(a)

    def own_attributes(self, module: nn.Module) -> None:
        """Name the tensors of replacement ``module`` after their attribute paths."""
        for prefix, sub in module.named_modules():
            tensors = {**sub._parameters, **sub._buffers}
            tensors.update((k, v) for k, v in vars(sub).items() if isinstance(v, torch.Tensor))
            for name, tensor in tensors.items():
                if tensor is not None:
                    path = f"{prefix}_{name}" if prefix else name
                    self.attribute_names.setdefault(id(tensor), path.replace(".", "_"))

    def new_attribute(self, attribute: NewAttribute, per_match: bool = True) -> ShapedProxy:
        """A ``get_attr`` template node standing for new state (see :mod:`torchgraft.ir.state`);
        ``per_match`` for state created by this trace (not shared between matches)."""
        self.per_match |= per_match
        node = fx.Tracer.create_node(self, "get_attr", attribute.name, (), {})
        node.meta[NEW_ATTRIBUTE] = attribute
        value = attribute.value
        if self.fake_mode is not None:
            value = self.fake_mode.from_tensor(value, static_shapes=True)
        node.meta["val"] = value
        return self.proxy(node)

    def fresh(self, val: Any) -> Any:
        """A value like ``val`` (same shapes, strides, dtypes, devices, ``requires_grad``) that
        shares nothing with it, so an in-place op in the replacement cannot change the
        graph's own ``meta["val"]``."""
        if _is_tensor(val):  # the common case, without a pytree walk
            return self._fresh_tensor(val)
        return tree_map_only(torch.Tensor, self._fresh_tensor, val)

    def _fresh_tensor(self, val: torch.Tensor) -> torch.Tensor:
        if self.fake_mode is None:
            copy = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
        else:  # wrapped from a meta tensor: a fake-mode op would cost ~100 µs of dispatch
            copy = fake_from_meta(self.fake_mode, meta_like(val), val.device)
        if not val.requires_grad:
            return copy
        copy.requires_grad_()
        if val.is_leaf:
            return copy
        context = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        with context:
            return copy.clone()  # a non-leaf, like ``val``

    def _run_fake(self, node: fx.Node, fn: Callable | None = None) -> Any:
        """Run ``node``'s op (or ``fn``, a leaf's fake function) on its inputs' fake values."""
        args, kwargs = map_aggregate((node.args, node.kwargs), _fake_value)
        if fn is None and self.fake_mode is not None:
            result = run_on_meta(self.fake_mode, node.target, args, kwargs)
            if result is not NOT_RUN:
                return result
        context = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        call = (
            (lambda: getattr(args[0], node.target)(*args[1:], **kwargs))
            if node.op == "call_method"
            else (lambda: (fn or node.target)(*args, **kwargs))
        )
        with context:
            try:
                return call()
            except DynamicOutputShapeException:
                if self.fake_mode is None or self.fake_mode.shape_env is not None:
                    raise
                # A data-dependent output (nonzero, masked_select): its sizes are unbacked
                # symbols, which need a shape environment (torch.export's mode has one).
                self.fake_mode.shape_env = ShapeEnv()
                return call()


def _fake_value(arg: Any) -> Any:
    if not isinstance(arg, fx.Node):
        return arg
    if "val" not in arg.meta:
        raise RuleDefinitionError(
            f"the replacement computes on the result of leaf call '{arg.name}' "
            f"({getattr(arg.target, '__name__', arg.target)}), which has no fake function: "
            "declare one with tg.leaf(fn, fake=...)"
        )
    return arg.meta["val"]


@dataclasses.dataclass
class Template:
    """A traced replacement: placeholders named after the pattern's tensor parameters."""

    graph: fx.Graph
    placeholders: dict[str, fx.Node]
    ops: list[fx.Node]
    outputs: list[Any]
    per_match: bool = False
    """True when the replacement creates state or reads values: trace it for every match."""


def _same_size(a: Any, b: Any) -> bool:
    """False only when two dimension sizes are known to differ (an unbacked or otherwise
    undecidable symbolic size, as ``nonzero`` gives, is not a mismatch)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not statically_known_true(sym_not(sym_eq(a, b)))


def describe_value(val: Any) -> str:
    """``[4, 8] float32`` for a tensor, ``repr`` for anything else."""
    if isinstance(val, torch.Tensor):
        return f"{list(val.shape)} {str(val.dtype).removeprefix('torch.')}"
    return repr(val)


def output_mismatch(new: Any, old: Any) -> bool:
    """Whether a replacement output ``new`` cannot stand in for the matched value ``old``
    (both ``meta["val"]``): another rank, dtype or a dimension known to differ. Values that
    are not both tensors are not compared."""
    if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)):
        return False
    if new.dtype != old.dtype or new.dim() != old.dim():
        return True
    return not all(map(_same_size, new.shape, old.shape))


def signature(match: Match) -> tuple:
    """Key of the matched values: the bindings' names, then per binding, for a tensor node,
    its shape, strides, dtype, device and ``requires_grad``; for another node its value's
    ``repr``; for a literal its ``repr``; then per output of the match its tensor's shape and
    dtype (None for another value), so that a template cached under the key was checked
    against those outputs (:func:`output_mismatch`). Symbolic sizes make it unhashable: such
    a match is traced on its own."""
    bindings = match.bindings
    key: list = [tuple(bindings)]
    # Reading a fake tensor's properties checks for a __torch_function__ override first;
    # FakeTensor has none. Skipping the check makes each read about half as costly (the
    # whole key ~20 % cheaper).
    with torch._C.DisableTorchFunctionSubclass():
        for value in bindings.values():
            if isinstance(value, fx.Node):
                val = value.meta.get("val")
                if _is_tensor(val):
                    key.append(
                        (val.shape, val.stride(), val.dtype, _device(val), val.requires_grad)
                    )
                else:
                    key.append(("node", repr(val)))
            else:
                key.append(("literal", repr(value)))
        for out in match.outputs:
            val = out.meta.get("val")
            key.append((val.shape, val.dtype) if _is_tensor(val) else None)
    return tuple(key)


def _is_tensor(val: Any) -> bool:
    # A graph's values are fake tensors: their type test skips Tensor's isinstance hook.
    return type(val) is FakeTensor or isinstance(val, torch.Tensor)


def _device(val: torch.Tensor) -> torch.device:
    # FakeTensor.device is a Python property that returns ``fake_device`` outside kernels.
    return val.fake_device if type(val) is FakeTensor else val.device


def trace_replacement(rule: Rule, match: Match) -> Template:
    """Trace ``rule``'s replacement for the values bound in ``match``."""
    node_vals = [v.meta.get("val") for v in match.bindings.values() if isinstance(v, fx.Node)]
    tracer = _Tracer(detect_fake_mode(node_vals))
    if isinstance(rule.replace_fn, nn.Module):
        tracer.own_attributes(rule.replace_fn)
    placeholders, kwargs = {}, {}
    for name, value in match.bindings.items():
        if isinstance(value, fx.Node):
            if "val" not in value.meta:
                raise RuleDefinitionError(
                    f"node '{value.name}' has no meta['val']; capture the model with tg.capture "
                    "so every node carries its fake value"
                )
            proxy = tracer.create_proxy("placeholder", name, (), {})
            proxy.node.meta["val"] = tracer.fresh(value.meta["val"])
            proxy.node.meta[BOUND_NODE] = value
            placeholders[name] = proxy.node
            kwargs[rule.argument_names.get(name, name)] = proxy
        else:
            kwargs[rule.argument_names.get(name, name)] = value
    args = (match.handler,) if rule.wants_handler else ()
    # The fake-tensor log's traceback would repeat the error we raise.
    with quiet_fake_tensor_log(), tracing(tracer), patched_fx_wraps():
        result = rule.replace_fn(*args, **kwargs)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    expected = len(rule.pattern.outputs)
    if len(results) != expected:
        raise RuleDefinitionError(
            f"replacement of rule '{rule.name}' returned {len(results)} values, the pattern has {expected} outputs"
        )
    outputs = []
    for value in results:
        if not isinstance(value, fx.Proxy):
            raise RuleDefinitionError(
                f"replacement of rule '{rule.name}' must return traced values (results of ops or "
                f"its tensor parameters), got {value!r}"
            )
        outputs.append(value.node)
    ops = [n for n in tracer.graph.nodes if n.op in ("call_function", "call_method", "get_attr")]
    return Template(tracer.graph, placeholders, ops, outputs, tracer.per_match)
