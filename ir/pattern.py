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
    if node.op == "call_module":
        kind = module_type(node)
        return f"{target} ({kind.__name__ if kind is not None else 'module'})"
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


OPS = ("call_function", "call_method", "call_module")
"""Node kinds a pattern matches and a match replaces."""


def module_type(node: fx.Node) -> type | None:
    """The class of the submodule a ``call_module`` node calls (None if unresolvable)."""
    root = node.graph.owning_module
    try:
        return type(root.get_submodule(node.target)) if root is not None else None
    except AttributeError:
        return None


class Pattern:
    """A pattern traced into an fx graph of placeholders, ops and outputs.

    ``fn`` is a function, an ``nn.Module`` (traced with ``torch.fx.symbolic_trace``, its
    leaf submodules kept as ``call_module`` nodes that match any call of a module of the
    same class) or an ``fx.GraphModule`` (used as is). A ``get_attr`` in a module pattern
    matches any ``get_attr`` of the graph (as in ``torch.fx.replace_pattern``); it is bound,
    not replaced, and is not a parameter of the replacement.
    """

    def __init__(self, fn: Callable, *, where: str) -> None:
        self.fn = fn
        try:
            self.module = fn if isinstance(fn, fx.GraphModule) else fx.symbolic_trace(fn)
        except Exception as exc:
            raise RuleDefinitionError(f"pattern {where} could not be traced: {exc}") from exc
        self.graph = self.module.graph
        self.annotations = _annotations(fn.forward if isinstance(fn, nn.Module) else fn)
        self.placeholders: dict[str, fx.Node] = {}
        self.ops: list[fx.Node] = []
        self.outputs: list[fx.Node] = []
        self.module_types: dict[fx.Node, type] = {}
        """Class of the submodule each ``call_module`` pattern node stands for."""
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.placeholders[node.target] = node  # the parameter's name
            elif node.op == "output":
                result = node.args[0]
                self.outputs = list(result) if isinstance(result, (tuple, list)) else [result]
            elif node.op in OPS:
                self.ops.append(node)
                if node.op == "call_module":
                    self.module_types[node] = module_type(node)
            elif node.op != "get_attr":
                raise RuleDefinitionError(
                    f"pattern {where}: '{node.format_node()}' is not allowed in a pattern"
                )
        self._validate(where)
        self.anchor = self.outputs[0]
        self.params = list(self.placeholders)
        self.internal = [node for node in self.ops if node not in self.outputs]
        """The ops whose values only the pattern itself uses (not outputs)."""
        self.op_names = [(node.name, node) for node in self.ops]
        """``(name, node)`` of each op, in pattern order (what a match's ``nodes`` maps)."""
        self.args = {node: call_args(node) for node in self.ops}
        """Each pattern op's normalized arguments (see :func:`call_args`)."""
        self.positional = {
            node: node.args
            for node in self.ops
            if isinstance(node.target, torch._ops.OpOverload) and not node.kwargs
        }
        """The arguments as written of the ops that call an OpOverload positionally: a graph
        call of it with as many positional arguments and no keywords has the same schema
        defaults after them, so the two compare without normalizing."""
        self.constrained = {
            name
            for name, annotation in self.annotations.items()
            if annotation is not inspect.Parameter.empty and annotation is not Any
        }
        """Parameters whose annotation restricts what they bind."""
        self.anchor_arg_targets = tuple(
            (i, arg.target)
            for i, arg in enumerate(self.args[self.anchor])
            if isinstance(arg, fx.Node) and arg.op in ("call_function", "call_method")
        )
        """``(position, target)`` of the anchor's arguments that are ops: a cheap pre-check."""

    def _validate(self, where: str) -> None:
        if not self.ops:
            raise RuleDefinitionError(f"pattern {where} calls no op")
        for out in self.outputs:
            if not isinstance(out, fx.Node) or out.op not in OPS:
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

    def candidates(self, graph: fx.Graph) -> list[fx.Node]:
        """Nodes of ``graph`` that call the anchor's op (indexed by ``graph.find_nodes``)."""
        anchor = self.anchor
        if anchor.op == "call_module":  # any call of a module of the anchor's class
            return [n for n in graph.find_nodes(op="call_module") if self.calls_same(anchor, n)]
        return graph.find_nodes(op=anchor.op, target=anchor.target)

    def calls_same(self, p: fx.Node, g: fx.Node) -> bool:
        """Whether graph node ``g`` calls what pattern op ``p`` calls (a module by class)."""
        if g.op != p.op:
            return False
        if p.op == "call_module":
            return module_type(g) is self.module_types[p]
        return g.target == p.target

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
