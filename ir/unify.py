"""Static pattern unification: can two rules' patterns match the same graph node?

If one graph node is matched by pattern node ``pa`` of rule A and by ``pb`` of rule B,
then ``pa`` and ``pb`` call the same op and their argument trees both match the node's
argument tree, so they unify: ops equal position by position (either order for an op
either rule declares commutative), literals equal, a parameter unifies with anything its
annotation accepts. Repeated parameters are not required to bind consistently, so the
answer over-approximates; the pass manager confirms it on the actual graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import fx

from torchgraft.ir.arguments import call_args
from torchgraft.ir.pattern import Pattern, accepts, literal_equal
from torchgraft.ir.rule import Rule


def unifiable_nodes(a: Rule, b: Rule) -> list[tuple[fx.Node, fx.Node]]:
    """Pairs ``(pa, pb)`` of op nodes of ``a``'s and ``b``'s patterns that could match one
    graph node, in pattern order."""
    unifier = _Unifier(a.pattern, b.pattern, a.commutative | b.commutative)
    return [(pa, pb) for pa in a.pattern.ops for pb in b.pattern.ops if unifier.unify(pa, pb)]


class _Unifier:
    def __init__(self, a: Pattern, b: Pattern, commutative: Iterable[Any]) -> None:
        self.a, self.b = a, b
        self.commutative = frozenset(commutative)

    def unify(self, x: Any, y: Any) -> bool:
        """Whether ``x`` (from pattern a) and ``y`` (from pattern b) can match one value."""
        if _is_param(x):
            return _is_param(y) or accepts(self._annotation(self.a, x), y)
        if _is_param(y):
            return accepts(self._annotation(self.b, y), x)
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
            if not self.a.calls_same(x, y):
                return False
            xs, ys = call_args(x), call_args(y)
            if len(xs) != len(ys):
                return False
            if self._all(xs, ys):
                return True
            return (
                x.target in self.commutative
                and len(xs) >= 2
                and self._all((xs[1], xs[0], *xs[2:]), ys)
            )
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and self._all(x, y)
        return literal_equal(x, y)

    def _all(self, xs: Iterable[Any], ys: Iterable[Any]) -> bool:
        return all(self.unify(x, y) for x, y in zip(xs, ys))

    @staticmethod
    def _annotation(pattern: Pattern, node: fx.Node) -> Any:
        return pattern.annotations.get(node.name, inspect.Parameter.empty)


def _is_param(value: Any) -> bool:
    # A module pattern's get_attr binds any get_attr: like a parameter, it unifies widely.
    return isinstance(value, fx.Node) and value.op in ("placeholder", "get_attr")
