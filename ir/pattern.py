"""Patterns: a Python function over ops, traced once into a small fx graph.

The pattern's parameters are wildcards: each binds one node or one literal of the target
graph, and a parameter used twice must bind the same thing twice. Literals written in the
pattern must match exactly; a literal that may vary (an ``eps``, a ``dim``) is declared free
by making it a parameter. A parameter annotated ``torch.Tensor`` binds only nodes, one
annotated ``float`` / ``int`` / ``bool`` / ``str`` only literals of that type, one annotated
``nn.Parameter`` / ``nn.Buffer`` only a ``get_attr`` of a parameter / buffer of the graph module.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from torchgraft.ir.arguments import call_args
from torchgraft.ir.errors import RuleDefinitionError
from torchgraft.ir.state import is_buffer, is_parameter


def target_name(node: fx.Node) -> str:
    """``aten.mul.Tensor`` for OpOverloads, the qualified name for other targets."""
    target = node.target
    if node.op == "call_method":
        return f".{target}()"
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def accepts(annotation: Any, value: Any) -> bool:
    """Whether a parameter annotated ``annotation`` may bind ``value`` (a node or literal)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in typing.get_args(annotation))
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is nn.Parameter:
        return is_parameter(value)
    if annotation is nn.Buffer:
        return is_buffer(value)
    if annotation is torch.Tensor or annotation is fx.Node:
        return isinstance(value, fx.Node)
    if isinstance(value, fx.Node) or not isinstance(annotation, type):
        return False
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _annotations(fn: Callable) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to unchecked parameters
        hints = {}
    return {
        name: hints.get(name, inspect.Parameter.empty) for name in inspect.signature(fn).parameters
    }


class Pattern:
    """A pattern function traced into an fx graph of placeholders, ops and outputs."""

    def __init__(self, fn: Callable, *, where: str) -> None:
        self.fn = fn
        try:
            self.graph = fx.symbolic_trace(fn).graph
        except Exception as exc:
            raise RuleDefinitionError(f"pattern {where} could not be traced: {exc}") from exc
        self.annotations = _annotations(fn)
        self.placeholders: dict[str, fx.Node] = {}
        self.ops: list[fx.Node] = []
        self.outputs: list[fx.Node] = []
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.placeholders[node.target] = node  # the parameter's name
            elif node.op == "output":
                result = node.args[0]
                self.outputs = list(result) if isinstance(result, (tuple, list)) else [result]
            elif node.op in ("call_function", "call_method"):
                self.ops.append(node)
            else:
                raise RuleDefinitionError(
                    f"pattern {where}: '{node.format_node()}' is not allowed in a pattern "
                    "(patterns call ops on their parameters; tensors constants and modules are not supported)"
                )
        self._validate(where)
        self.anchor = self.outputs[0]
        self.params = list(self.placeholders)
        self.args = {node: call_args(node) for node in self.ops}
        """Each pattern op's normalized arguments (see :func:`call_args`)."""
        self.anchor_arg_targets = tuple(
            (i, arg.target)
            for i, arg in enumerate(self.args[self.anchor])
            if isinstance(arg, fx.Node) and arg.op != "placeholder"
        )
        """``(position, target)`` of the anchor's arguments that are ops: a cheap pre-check."""

    def _validate(self, where: str) -> None:
        if not self.ops:
            raise RuleDefinitionError(f"pattern {where} calls no op")
        for out in self.outputs:
            if not isinstance(out, fx.Node) or out.op not in ("call_function", "call_method"):
                raise RuleDefinitionError(
                    f"pattern {where}: every output must be the result of an op, got {out!r}"
                )
        unused = [name for name, node in self.placeholders.items() if not node.users]
        if unused:
            raise RuleDefinitionError(f"pattern {where}: parameters {unused} are never used")
        if len(self.outputs) > 1 and not self._connected():
            raise RuleDefinitionError(
                f"pattern {where}: its outputs share no node or parameter; write separate rules"
            )

    def _connected(self) -> bool:
        seen, todo = set(), [self.outputs[0]]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            todo.extend(node.all_input_nodes)
            todo.extend(u for u in node.users if u.op != "output")
        return all(node in seen for node in self.ops)


def same_value(a: Any, b: Any) -> bool:
    """Equality for bindings: identity for nodes, typed equality for literals."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return literal_equal(a, b)


def literal_equal(a: Any, b: Any) -> bool:
    """``a == b`` for literals, where ``True`` never equals ``1`` and lists equal tuples."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(literal_equal, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:  # e.g. comparing a SymInt that cannot be decided
        return a is b
