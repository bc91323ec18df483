"""A call's arguments normalized by parameter name, so that spellings of one call unify.

``aten.mean.dim(x, [-1], keepdim=True)`` and ``aten.mean.dim(x, [-1], True)`` are one call;
so are ``torch.clamp(x, 0.0, 1.0)``, ``torch.clamp(x, min=0.0, max=1.0)`` and
``x.clamp(max=1.0, min=0.0)``, while ``torch.clamp(x, min=0.0)`` and
``torch.clamp(x, max=0.0)`` are not. Each call is bound to its target's signature (the
OpOverload's schema; for torch-level functions and ``Tensor`` methods the ATen schemas
torch.fx itself uses, ``torch.fx.operator_schemas.get_signature_for_torch_op``; for Python
functions ``inspect.signature``; for a ``call_module`` its module's ``forward``) and becomes one tuple of values in parameter order, with
defaults filled in. Of several overloads the first that binds and whose tensor parameters
receive tensors wins (``torch.max(x, 1)`` is ``max.dim``, ``torch.max(x, y)`` ``max.other``).
A call that binds to no signature keeps its positional arguments followed by its keyword
arguments as ``(name, value)`` pairs, sorted by name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

_REQUIRED = object()


class _Kind:
    """Annotation of a parameter of a signature built from a schema."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_TENSOR = _Kind("Tensor")
"""A parameter that takes only tensors (or None when optional)."""
_OTHER = _Kind("other")
"""A parameter that takes no tensor (scalars, lists, dtypes ...)."""


_SCHEMAS: dict[int, tuple[Any, tuple[tuple[str, Any], ...]]] = {}
"""id(OpOverload) → (the overload, its ``_schema`` result): hashing an OpOverload calls
Python code, and overloads live as long as their op (the entry keeps it alive anyway)."""


def _schema(target: Any) -> tuple[tuple[str, Any], ...] | None:
    """``(name, default)`` per argument of an OpOverload's schema; None for other targets."""
    known = _SCHEMAS.get(id(target))
    if known is not None and known[0] is target:
        return known[1]
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = tuple(
        (a.name, a.default_value if a.has_default_value() else _REQUIRED)
        for a in target._schema.arguments
    )
    _SCHEMAS[id(target)] = (target, schema)
    return schema


def _from_schema(schema: torch._C.FunctionSchema) -> inspect.Signature:
    """An ``inspect.Signature`` with the schema's names, defaults and tensor-ness."""
    params, kinds = [], (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    optional_tensor = torch._C.OptionalType.ofTensor()
    for a in schema.arguments:
        tensor = a.type.isSubtypeOf(optional_tensor)
        params.append(
            inspect.Parameter(
                a.name,
                kinds[a.kwarg_only],
                default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
                annotation=_TENSOR if tensor else _OTHER,
            )
        )
    return inspect.Signature(params)


def _uncached_signatures(op: str, target: Any) -> tuple[inspect.Signature, ...]:
    if op == "call_method":
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{target}")
        return tuple(_from_schema(s) for s in schemas)
    if op != "call_function":
        return ()
    try:
        _, schemas = get_signature_for_torch_op(target, return_schemas=True)
    except Exception:  # a callable torch cannot look up: use its Python signature
        schemas = None
    if schemas:
        return tuple(_from_schema(s) for s in schemas)
    try:
        return (inspect.signature(target),)
    except (TypeError, ValueError):  # a builtin without introspectable signature
        return ()


@functools.cache
def _cached_signatures(op: str, target: Any) -> tuple[inspect.Signature, ...]:
    return _uncached_signatures(op, target)


@functools.cache
def _forward_signature(kind: type) -> tuple[inspect.Signature, ...]:
    try:
        params = list(inspect.signature(kind.forward).parameters.values())[1:]  # no self
    except (TypeError, ValueError):
        return ()
    return (inspect.Signature(params),)


def _node_signatures(node: fx.Node) -> tuple[inspect.Signature, ...]:
    if node.op != "call_module":
        return signatures(node.op, node.target)
    root = node.graph.owning_module
    try:
        module = root.get_submodule(node.target) if root is not None else None
    except AttributeError:
        module = None
    return _forward_signature(type(module)) if module is not None else ()


def signatures(op: str, target: Any) -> tuple[inspect.Signature, ...]:
    """The signatures a non-OpOverload call target may be bound to, in overload order."""
    try:
        return _cached_signatures(op, target)
    except TypeError:  # an unhashable target
        return _uncached_signatures(op, target)


def _is_tensor(value: Any) -> bool | None:
    """True for a node known to hold a tensor, False for a literal, None when unknown
    (pattern nodes carry no ``meta['val']``)."""
    if isinstance(value, fx.Node):
        return True if isinstance(value.meta.get("val"), torch.Tensor) else None
    return False if value is not None else None


def _fits(signature: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    for name, value in bound.arguments.items():
        annotation = signature.parameters[name].annotation
        tensor = _is_tensor(value)
        if (annotation is _TENSOR and tensor is False) or (annotation is _OTHER and tensor):
            return False
    return True


def bind(node: fx.Node) -> tuple[tuple[str, ...], tuple] | None:
    """``(parameter names, values)`` of a torch-level, method or module call bound to the
    first signature of its target that accepts it (a module's ``forward``), defaults filled
    in; None if none does."""
    for signature in _node_signatures(node):
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        if not _fits(signature, bound):
            continue
        bound.apply_defaults()
        return tuple(bound.arguments), tuple(bound.arguments.values())
    return None


def call_args(node: fx.Node) -> tuple:
    """The node's arguments as one positional tuple in parameter order, defaults filled in.

    See the module docstring for how each kind of target is bound.
    """
    schema = _schema(node.target) if node.op == "call_function" else None
    if schema is None:
        bound = bind(node)
        if bound is not None:
            return bound[1]
        return tuple(node.args) + tuple(sorted(node.kwargs.items()))
    args, kwargs = node.args, node.kwargs
    if not kwargs and len(args) == len(schema):
        return tuple(args)
    out = list(args)
    for name, default in schema[len(args) :]:
        value = kwargs.get(name, default)
        out.append(None if value is _REQUIRED else value)
    return tuple(out)


def call_args_like(node: fx.Node, length: int) -> tuple:
    """:func:`call_args` with a fast path: a node without keyword arguments that already
    has ``length`` positional ones (the usual case in exported graphs) is returned as is."""
    args = node._args  # the storage of Node.args / .kwargs: no property call
    if len(args) == length and not node._kwargs:
        return args
    return call_args(node)


def argument_name(node: fx.Node, index: int) -> str:
    """Human name of argument ``index`` of ``node`` (its parameter's name where known)."""
    schema = _schema(node.target) if node.op == "call_function" else None
    if schema is not None:
        names = [name for name, _ in schema]
    else:
        bound = bind(node)
        names = list(bound[0]) if bound is not None else []
    if index < len(names):
        return f"argument {index} ('{names[index]}')"
    return f"argument {index}"
