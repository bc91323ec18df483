"""Compile a pattern into straight-line Python that matches it at one anchor.

The matcher's solver (:mod:`torchgraft.ir.matcher`) unifies a pattern by interpreting a
work list: per pattern element it pops a pair, dispatches on its kind and pushes the
arguments, a few microseconds of bookkeeping per element. For a pattern with one output
and no operands declared commutative there is nothing to search: the order in which the
solver meets the pattern's elements depends on the pattern alone, and every check either
passes or rejects the anchor. Such a pattern compiles into one function of the anchor
node whose body is those checks, written out in that order — what the solver would do,
without the interpretation — and which returns the :class:`~torchgraft.ir.rule.Match`
when the structure and the validity checks hold (the rule's filters are left to the
caller). Other patterns return None here and keep the solver; so does ``explain``, which
needs the solver's record of the first failure.

The generated source refers to the pattern's targets, literals and names only through
variables of its namespace (``_c0``, ``_c1`` ...), never through their ``repr``, so nothing
of a pattern is parsed as code.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from torchgraft.ir.arguments import call_args_like
from torchgraft.ir.pattern import accepts, same_value
from torchgraft.ir.rule import Match, Rule

CompiledMatch = Callable[[fx.Node, Callable[[fx.Node], bool], Any], "Match | None"]
"""``(anchor, is_live, handler) -> Match | None``: the anchor calls the pattern's anchor op
and is live (the caller's checks)."""

PLAIN_LITERALS = frozenset({int, float, str, bool, type(None), torch.dtype, torch.device})
"""Literal types whose ``==`` between two values of the same type is ``same_value``'s."""

_compiled: weakref.WeakKeyDictionary[Rule, CompiledMatch | None] = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """The pattern needs the solver (alternatives to search, or arguments it cannot plan)."""


def compiled_matcher(rule: Rule, is_assertion: Callable[[fx.Node], bool]) -> CompiledMatch | None:
    """The compiled matcher of ``rule``'s pattern (made once per rule), or None when the
    pattern needs the solver: several outputs, or an op in ``rule.commutative``."""
    if rule not in _compiled:
        try:
            _compiled[rule] = _Emitter(rule, is_assertion).compile()
        except _Unsupported:
            _compiled[rule] = None
    return _compiled[rule]


class _Emitter:
    """Writes the checks of one pattern, element by element, as the solver meets them."""

    def __init__(self, rule: Rule, is_assertion: Callable[[fx.Node], bool]) -> None:
        self.rule = rule
        self.pattern = rule.pattern
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {
            "Node": fx.Node,
            "Match": Match,
            "call_args_like": call_args_like,
            "same_value": same_value,
            "accepts": accepts,
            "is_assertion": is_assertion,
            "calls_same": self.pattern.calls_same,
        }
        self.bound: dict[fx.Node, str] = {}
        """Pattern node → the variable holding what it matched or bound."""
        self.op_vars: list[str] = []
        """Variables of the graph nodes the pattern's ops matched, in the order met."""
        self.constrained = self.pattern.constrained
        self._count = 0

    def compile(self) -> CompiledMatch:
        pattern = self.pattern
        if len(pattern.outputs) != 1 or any(p.target in self.rule.commutative for p in pattern.ops):
            raise _Unsupported
        self.bound[pattern.anchor] = "g0"
        self.op_vars.append("g0")
        self._arguments(pattern.anchor, "g0", 1)
        if any(p not in self.bound for p in pattern.ops):
            raise _Unsupported  # an op the anchor does not reach
        self._validity()
        nodes = ", ".join(f"{self.const(name)}: {self.bound[p]}" for name, p in pattern.op_names)
        bindings = ", ".join(
            f"{self.const(name)}: {self.bound[p]}" for name, p in pattern.placeholders.items()
        )
        self.line(
            1,
            f"return Match({self.const(self.rule)}, g0, {{{nodes}}}, {{{bindings}}}, [g0], handler)",
        )
        source = "def match(g0, is_live, handler):\n" + "\n".join(self.lines) + "\n"
        code = compile(source, f"<torchgraft pattern of rule {self.rule.name!r}>", "exec")
        exec(code, self.namespace)
        return self.namespace["match"]

    def const(self, value: Any) -> str:
        name = f"_c{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def var(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def line(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def reject_if(self, indent: int, condition: str) -> None:
        self.line(indent, f"if {condition}:")
        self.line(indent + 1, "return None")

    def _element(self, item: Any, expr: str, indent: int) -> None:
        """Check graph value ``expr`` against pattern element ``item``."""
        if isinstance(item, fx.Node):
            if item.op == "placeholder":
                self._placeholder(item, expr, indent)
            elif item.op == "get_attr":
                self._attribute(item, expr, indent)
            else:
                self._op(item, expr, indent)
        elif isinstance(item, (list, tuple)):
            self.reject_if(
                indent, f"not isinstance({expr}, (list, tuple)) or len({expr}) != {len(item)}"
            )
            for i, sub in enumerate(item):
                element = self.var("e")
                self.line(indent, f"{element} = {expr}[{i}]")
                self._element(sub, element, indent)
        else:
            literal = self.const(item)
            condition = f"isinstance({expr}, Node) or not same_value({literal}, {expr})"
            if type(item) in PLAIN_LITERALS:  # the common case first, without same_value
                kind = self.const(type(item))
                condition = (
                    f"not (type({expr}) is {kind} and {expr} == {literal}) and ({condition})"
                )
            self.reject_if(indent, condition)

    def _placeholder(self, p: fx.Node, expr: str, indent: int) -> None:
        if p in self.bound:
            self.reject_if(indent, f"not same_value({self.bound[p]}, {expr})")
            return
        if p.target in self.constrained:
            annotation = self.const(self.pattern.annotations[p.target])
            self.reject_if(indent, f"not accepts({annotation}, {expr})")
        self.bound[p] = expr

    def _attribute(self, p: fx.Node, expr: str, indent: int) -> None:
        self.reject_if(indent, f"not (isinstance({expr}, Node) and {expr}.op == 'get_attr')")
        if p in self.bound:
            self.reject_if(indent, f"{expr} is not {self.bound[p]}")
        else:
            self.bound[p] = expr

    def _op(self, p: fx.Node, expr: str, indent: int) -> None:
        if p in self.bound:
            self.reject_if(indent, f"{expr} is not {self.bound[p]}")
            return
        if p.op == "call_module":
            same_call = f"not calls_same({self.const(p)}, {expr})"
        else:  # OpOverloads are singletons: identity is their equality, and cheaper
            differs = "is not" if isinstance(p.target, torch._ops.OpOverload) else "!="
            same_call = (
                f"{expr}.op != {self.const(p.op)} or {expr}.target {differs} {self.const(p.target)}"
            )
        self.reject_if(indent, f"not isinstance({expr}, Node) or {same_call}")
        taken = " or ".join(f"{expr} is {v}" for v in self.op_vars)
        self.reject_if(indent, f"{taken} or not is_live({expr})")
        self.bound[p] = expr
        self.op_vars.append(expr)
        self._arguments(p, expr, indent)

    def _arguments(self, p: fx.Node, expr: str, indent: int) -> None:
        """The op's arguments: as written when the graph calls it positionally with as many
        (the defaults after them are the schema's on both sides), else normalized."""
        normalized = self.pattern.args[p]
        written = self.pattern.positional.get(p)
        args = self.var("a")
        if written is None:
            self.line(indent, f"{args} = call_args_like({expr}, {len(normalized)})")
            self.reject_if(indent, f"len({args}) != {len(normalized)}")
            head = range(len(normalized))
        else:
            count = len(written)
            tail = normalized[count:]
            if not all(map(operator.is_, normalized[:count], written)) or _has_node(tail):
                raise _Unsupported
            self.line(indent, f"{args} = {expr}._args")
            self.line(indent, f"if len({args}) != {count} or {expr}._kwargs:")
            self.line(indent + 1, f"{args} = call_args_like({expr}, {len(normalized)})")
            self.reject_if(indent + 1, f"len({args}) != {len(normalized)}")
            for i, item in enumerate(tail, start=count):
                element = self.var("e")
                self.line(indent + 1, f"{element} = {args}[{i}]")
                self._element(item, element, indent + 1)
            head = range(count)
        for i in head:
            element = self.var("e")
            self.line(indent, f"{element} = {args}[{i}]")
            self._element(normalized[i], element, indent)

    def _validity(self) -> None:
        """``matcher._validity_failure``: no parameter binds a matched op's node, and no
        intermediate value is used outside the match (metadata assertions aside)."""
        matched = self.op_vars
        for p in self.pattern.placeholders.values():
            self.reject_if(1, " or ".join(f"{self.bound[p]} is {v}" for v in matched))
        outside = " and ".join(f"user is not {v}" for v in matched)
        for p in self.pattern.internal:
            self.line(1, f"for user in {self.bound[p]}.users:")
            self.reject_if(2, f"{outside} and is_live(user) and not is_assertion(user)")


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (list, tuple)) and any(map(_has_node, value))
