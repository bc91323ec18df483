"""Find where a rule's pattern matches: indexed anchors, backward unification.

Candidates come from ``graph.find_nodes(op, target)`` for the pattern's anchor (its first
output); from each, the pattern is unified backward through the arguments. Pattern ops
not reachable backward from the anchor (other outputs) are reached through the users of
nodes already matched. The first solution in graph order wins; overlapping matches of
one rule keep the earliest anchor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from torchgraft.ir.arguments import argument_name, call_args_like
from torchgraft.ir.match_compiler import PLAIN_LITERALS, compiled_matcher
from torchgraft.ir.pattern import OPS, accepts, same_value, target_name
from torchgraft.ir.provenance import describe
from torchgraft.ir.rule import Match, Rule

IsLive = Callable[[fx.Node], bool]


def _always_live(node: fx.Node) -> bool:
    return True


FAILURE_KINDS = (
    "wrong_anchor",  # the node is not the op the pattern ends in
    "wrong_op",  # an input is computed by another op than the pattern's
    "literal_mismatch",  # a literal written in the pattern differs from the graph's
    "list_mismatch",  # a list argument differs in length or kind
    "argument_count",  # the op is called with another number of arguments
    "annotation_mismatch",  # a parameter's annotation rejects the bound value
    "parameter_bound_twice",  # one parameter meets two different values
    "pattern_shares_node",  # one pattern op would match two graph nodes
    "graph_shares_node",  # two pattern ops would match one graph node
    "output_not_found",  # another output of the pattern is not among the users
    "parameter_binds_pattern_op",  # a parameter binds a node the pattern's ops match
    "internal_node_used_outside",  # an intermediate value has users outside the match
    "include_glob",  # the module is not in the rule's include= globs
    "exclude_glob",  # the module is in the rule's exclude= globs
    "handler_reject",  # the handler's reject() refused the match
    "where_predicate",  # the rule's where= predicate returned False
)
"""Every :attr:`Failure.kind`, in the order the matcher checks them."""


@dataclasses.dataclass
class Failure:
    """Why a rule did not match at a node."""

    kind: str
    """One of :data:`FAILURE_KINDS`."""
    reason: str
    pattern_node: str | None = None
    argument: str | None = None

    def __str__(self) -> str:
        where = f"pattern node '{self.pattern_node}'" if self.pattern_node else "the match"
        if self.argument:
            where += f", {self.argument}"
        return f"{where}: {self.reason}"


class _Solver:
    """Unifies a pattern against a graph from one anchor, with backtracking."""

    def __init__(
        self,
        rule: Rule,
        is_live: IsLive,
        accept: Callable[[dict, set], Failure | None],
        record: bool,
    ) -> None:
        self.rule = rule
        self.pattern = rule.pattern
        self.is_live = is_live
        self.accept = accept
        self.record = record
        self.commutative = frozenset(p for p in self.pattern.ops if p.target in rule.commutative)
        """Pattern ops declared commutative (a set of nodes: cheaper to test than targets)."""
        self.unanchored = _not_above(self.pattern.anchor, self.pattern.ops)
        """Pattern ops not reachable backward from the anchor (other outputs' ops), in
        pattern order: only these can be missing when the work list runs empty."""
        self.constrained = self.pattern.constrained
        self.plans = {p: self._plan(p, args) for p, args in self.pattern.args.items()}
        """Per pattern op: its normalized arguments with their contexts (for failure
        messages), and the arguments as written when it calls an OpOverload positionally
        (see ``Pattern.positional``; ``-1`` arguments otherwise) with theirs."""
        self.failure: Failure | None = None

    def _plan(self, p: fx.Node, args: tuple) -> tuple:
        contexts = [(p, i, ()) for i in range(len(args))]
        written = self.pattern.positional.get(p)
        if written is None:
            return args, contexts, -1, None, None
        return args, contexts, len(written), written, contexts[: len(written)]

    def _fail(self, ctx: tuple | None, kind: str, reason: Callable[[], str]) -> None:
        """Record the first failure (when explaining) and return None to backtrack."""
        if self.record and self.failure is None:
            if ctx is None:
                self.failure = Failure(kind, reason())
            else:
                pnode, index, path = ctx
                arg = argument_name(pnode, index) + "".join(f"[{i}]" for i in path)
                self.failure = Failure(kind, reason(), pnode.name, arg)
        return None

    def _reject(self, failure: Failure) -> None:
        if self.record and self.failure is None:
            self.failure = failure
        return None

    def solve(self, anchor: fx.Node) -> dict[fx.Node, Any] | None:
        """A complete, accepted binding of the pattern with its anchor at ``anchor``, or None."""
        return self._unify([(self.pattern.anchor, anchor, None)], {}, set())

    def _complete(self, state: dict, used: set) -> dict | None:
        """Called when the work list is empty: reach the pattern ops not reachable backward
        from the anchor through users of matched nodes, then run the acceptance check.
        Returning None backtracks into the caller's remaining alternatives."""
        pending = (
            next(
                (
                    (p, src)
                    for p in self.unanchored
                    if p not in state
                    for src in p.all_input_nodes
                    if isinstance(state.get(src), fx.Node)
                ),
                None,
            )
            if self.unanchored
            else None
        )
        if pending is None:
            failure = self.accept(state, used)
            return state if failure is None else self._reject(failure)
        p, src = pending
        for cand in state[src].users:
            if self.pattern.calls_same(p, cand) and cand not in used and self.is_live(cand):
                solved = self._unify([(p, cand, None)], dict(state), set(used))
                if solved is not None:
                    return solved
        return self._fail(
            None,
            "output_not_found",
            lambda: (
                f"no user of '{state[src].name}' matches pattern node '{p.name}' ({target_name(p)})"
            ),
        )

    def _unify(self, work: list, state: dict, used: set) -> dict | None:
        while work:
            p, g, ctx = work.pop()
            if isinstance(p, fx.Node):
                op = p.op
                if op == "placeholder":
                    if p in state:
                        if not same_value(state[p], g):
                            return self._fail(
                                ctx,
                                "parameter_bound_twice",
                                lambda p=p, g=g, s=state: (
                                    f"parameter '{p.target}' is bound to {_show(s[p])} but here is {_show(g)}"
                                ),
                            )
                    elif p.target in self.constrained and not accepts(
                        self.pattern.annotations[p.target], g
                    ):
                        return self._fail(
                            ctx,
                            "annotation_mismatch",
                            lambda p=p, g=g: (
                                f"parameter '{p.target}' is annotated "
                                f"{self.pattern.annotations[p.target]} and cannot bind {_show(g)}"
                            ),
                        )
                    else:
                        state[p] = g
                    continue
                if op == "get_attr":
                    if not (isinstance(g, fx.Node) and g.op == "get_attr"):
                        return self._fail(
                            ctx,
                            "wrong_op",
                            lambda p=p, g=g: (
                                f"pattern attribute '{p.target}' matches a get_attr, found {_show(g)}"
                            ),
                        )
                    if state.setdefault(p, g) is not g:
                        return self._fail(
                            ctx,
                            "parameter_bound_twice",
                            lambda p=p, g=g, s=state: (
                                f"pattern attribute '{p.target}' is bound to {_show(s[p])} but here is {_show(g)}"
                            ),
                        )
                    continue
                if not isinstance(g, fx.Node):
                    return self._fail(
                        ctx,
                        "wrong_op",
                        lambda p=p, g=g: f"expected {target_name(p)}, found literal {g!r}",
                    )
                if g.op != op or (g.target != p.target and not self.pattern.calls_same(p, g)):
                    return self._fail(
                        ctx,
                        "wrong_op",
                        lambda p=p, g=g: f"expected {target_name(p)}, found {_show(g)}",
                    )
                if p in state:
                    if state[p] is not g:
                        return self._fail(
                            ctx,
                            "pattern_shares_node",
                            lambda p=p, g=g: (
                                f"pattern node '{p.name}' already matched '{state[p].name}', not '{g.name}'"
                            ),
                        )
                    continue
                if g in used or not self.is_live(g):
                    return self._fail(
                        ctx,
                        "graph_shares_node",
                        lambda g=g: f"'{g.name}' is already part of this match",
                    )
                state[p] = g
                used.add(g)
                pargs, contexts, count, written, written_contexts = self.plans[p]
                gargs = g._args  # the storage of Node.args / .kwargs: no property call
                if len(gargs) == count and not g._kwargs:
                    pargs, contexts = written, written_contexts  # both tails are the defaults
                else:
                    gargs = call_args_like(g, len(pargs))
                    if len(pargs) != len(gargs):
                        counts = (len(gargs), len(pargs))
                        return self._fail(
                            ctx,
                            "argument_count",
                            lambda g=g, c=counts: (
                                f"'{g.name}' has {c[0]} arguments, the pattern {c[1]}"
                            ),
                        )
                if p in self.commutative and len(pargs) >= 2:
                    # Either operand order may match; drop an order whose operand is sure
                    # to fail (when explaining, try both: the first failure is reported).
                    x, y = pargs[0], pargs[1]
                    a, b = gargs[0], gargs[1]
                    straight = self.record or (_may_unify(x, a) and _may_unify(y, b))
                    crossed = self.record or (_may_unify(x, b) and _may_unify(y, a))
                    if straight and crossed:
                        pairs = list(zip(pargs, gargs, contexts))
                        swapped = [(x, b, contexts[0]), (y, a, contexts[1])]
                        for alternative in (pairs, swapped + pairs[2:]):
                            solved = self._unify(work + alternative[::-1], dict(state), set(used))
                            if solved is not None:
                                return solved
                        return None
                    if not (straight or crossed):
                        return None
                    if crossed:
                        gargs = (b, a, *gargs[2:])
                work.extend(zip(reversed(pargs), reversed(gargs), reversed(contexts)))
            elif isinstance(p, (list, tuple)):
                if not isinstance(g, (list, tuple)) or len(g) != len(p):
                    return self._fail(
                        ctx,
                        "list_mismatch",
                        lambda p=p, g=g: f"expected a list like {p!r}, found {_show(g)}",
                    )
                pnode, index, path = ctx
                work.extend(
                    (pi, gi, (pnode, index, (*path, i)))
                    for i, (pi, gi) in reversed(list(enumerate(zip(p, g))))
                )
            elif type(p) is type(g) and type(p) in PLAIN_LITERALS and p == g:
                continue  # the common case, decided without same_value
            elif isinstance(g, fx.Node) or not same_value(p, g):
                return self._fail(
                    ctx,
                    "literal_mismatch",
                    lambda p=p, g=g: f"expected literal {p!r}, found {_show(g)}",
                )
        return self._complete(state, used)


def _may_unify(p: Any, g: Any) -> bool:
    """False when unifying pattern value ``p`` with graph value ``g`` is sure to fail at
    once: the pattern's op against a literal or a node of another op (``_unify``'s first
    checks of an op)."""
    if not isinstance(p, fx.Node) or p.op not in OPS:
        return True
    return (
        isinstance(g, fx.Node) and g.op == p.op and (g.target == p.target or p.op == "call_module")
    )


def _not_above(anchor: fx.Node, ops: list[fx.Node]) -> list[fx.Node]:
    """The ``ops`` that ``anchor`` does not reach through its inputs, in order."""
    above, todo = set(), [anchor]
    while todo:
        node = todo.pop()
        if node not in above:
            above.add(node)
            todo.extend(node.all_input_nodes)
    return [p for p in ops if p not in above]


def _show(value: Any) -> str:
    if isinstance(value, fx.Node):
        if value.op in ("call_function", "call_method"):
            return f"'{value.name}' ({target_name(value)})"
        return f"'{value.name}' ({value.op})"
    return repr(value)


ASSERTION_TARGETS = frozenset({torch.ops.aten._assert_tensor_metadata.default})
"""Metadata checks ``torch.export`` records on values: they do not keep an intermediate
value of a match alive, and are removed with it."""


_ASSERTION_IDS = frozenset(map(id, ASSERTION_TARGETS))
"""Ids of the targets: OpOverloads are singletons, and hashing one calls Python code."""


def is_assertion(node: fx.Node) -> bool:
    """Whether ``node`` only checks another node's metadata (see :data:`ASSERTION_TARGETS`)."""
    return id(node.target) in _ASSERTION_IDS and node.op == "call_function"


def _validity_failure(
    rule: Rule, state: dict[fx.Node, Any], ops: set[fx.Node], is_live: IsLive
) -> Failure | None:
    """Why replacing this structural match (``ops``: the graph nodes its ops matched) would
    be wrong, or None."""
    pattern = rule.pattern
    for name, pnode in pattern.placeholders.items():
        bound = state[pnode]
        if isinstance(bound, fx.Node) and bound in ops:
            return Failure(
                "parameter_binds_pattern_op",
                f"parameter '{name}' binds '{bound.name}', which the pattern's ops also match",
            )
    for p in pattern.internal:
        node = state[p]
        for user in node.users:
            if user not in ops and is_live(user) and not is_assertion(user):
                return Failure(
                    "internal_node_used_outside",
                    f"internal node '{node.name}' is also used by '{user.name}' outside the "
                    "match; replacing it would change that user",
                )
    return None


def _build_match(rule: Rule, state: dict[fx.Node, Any], handler: Any) -> Match:
    pattern = rule.pattern
    return Match(
        rule,
        state[pattern.anchor],
        {name: state[p] for name, p in pattern.op_names},
        {name: state[p] for name, p in pattern.placeholders.items()},
        [state[p] for p in pattern.outputs],
        handler,
    )


def _filter_failure(match: Match) -> Failure | None:
    """Why the rule's module globs, the handler or ``where`` reject a structural match."""
    rule = match.rule
    if rule.include or rule.exclude:
        fqn = match.module_fqn
        if rule.include and not any(fnmatch.fnmatchcase(fqn, g) for g in rule.include):
            return Failure("include_glob", f"module '{fqn}' is not in include={list(rule.include)}")
        hit = next((g for g in rule.exclude if fnmatch.fnmatchcase(fqn, g)), None)
        if hit is not None:
            return Failure("exclude_glob", f"module '{fqn}' is excluded by exclude glob {hit!r}")
    if match.handler is not None:
        reason = match.handler.reject(match)
        if reason:
            return Failure(
                "handler_reject", f"handler '{match.handler.display_name}' rejects it: {reason}"
            )
    if rule.where is not None and not rule.where(match):
        return Failure("where_predicate", f"where= predicate of rule '{rule.name}' returned False")
    return None


class _Acceptance:
    """The checks a complete structural binding must pass; keeps the accepted Match."""

    def __init__(self, rule: Rule, handler: Any, is_live: IsLive) -> None:
        self.rule, self.handler, self.is_live = rule, handler, is_live
        self.match: Match | None = None

    def __call__(self, state: dict, ops: set) -> Failure | None:
        failure = _validity_failure(self.rule, state, ops, self.is_live)
        if failure is None:
            self.match = _build_match(self.rule, state, self.handler)
            failure = _filter_failure(self.match)
        return failure


class _AnchoredMatcher:
    """Matches one rule at candidate anchors, reusing its solver between anchors."""

    def __init__(self, rule: Rule, handler: Any, is_live: IsLive) -> None:
        self.rule = rule
        self.is_live = is_live
        self.handler = handler
        self.accept = _Acceptance(rule, handler, is_live)
        self.solver = _Solver(rule, is_live, self.accept, record=False)
        self.compiled = compiled_matcher(rule, is_assertion)
        """The pattern as straight-line code (see :mod:`torchgraft.ir.match_compiler`), or
        None: then the solver searches."""
        self.filtered = bool(rule.include or rule.exclude or rule.where or handler is not None)
        pattern = rule.pattern
        self.expected = pattern.anchor_arg_targets
        self.arity = len(pattern.args[pattern.anchor])
        self.swappable = pattern.anchor.target in rule.commutative

    def __call__(self, node: fx.Node) -> Match | None:
        if not self.rule.pattern.calls_same(self.rule.pattern.anchor, node):
            return None
        return self.at_candidate(node)

    def at_candidate(self, node: fx.Node) -> Match | None:
        """The match at ``node``, which calls the anchor's op (one of ``candidates``)."""
        if not self.is_live(node):
            return None
        if self.compiled is not None:
            match = self.compiled(node, self.is_live, self.handler)
            if match is None or (self.filtered and _filter_failure(match) is not None):
                return None
            return match
        if not self._may_match(node):
            return None
        self.accept.match = None
        if self.solver.solve(node) is None:
            return None
        return self.accept.match

    def _may_match(self, node: fx.Node) -> bool:
        """Cheap rejection before unification: the anchor's op arguments must have the
        pattern's targets (in either order for a declared-commutative anchor)."""
        if not self.expected:
            return True
        args = call_args_like(node, self.arity)
        if _args_have(args, self.expected):
            return True
        swapped = (args[1], args[0], *args[2:]) if self.swappable and len(args) >= 2 else None
        return swapped is not None and _args_have(swapped, self.expected)


def _args_have(args: tuple, expected: tuple[tuple[int, Any], ...]) -> bool:
    for i, target in expected:
        if i >= len(args):
            return False
        arg = args[i]
        if not isinstance(arg, fx.Node) or arg.target != target:
            return False
    return True


def match_at(
    rule: Rule, node: fx.Node, handler: Any = None, is_live: IsLive = _always_live
) -> Match | None:
    """The match of ``rule`` anchored at ``node``, or None."""
    return _AnchoredMatcher(rule, handler, is_live)(node)


def find_matches(
    graph: fx.Graph, rule: Rule, handler: Any = None, is_live: IsLive = _always_live
) -> list[Match]:
    """All non-overlapping matches of ``rule`` in ``graph``, in graph order of their anchors."""
    match_here = _AnchoredMatcher(rule, handler, is_live)
    claimed: set[fx.Node] = set()
    matches = []
    for node in rule.pattern.candidates(graph):
        if node in claimed:
            continue
        match = match_here.at_candidate(node)
        if match is None:
            continue
        replaced = match.nodes.values()
        if claimed.isdisjoint(replaced):
            claimed.update(replaced)
            matches.append(match)
    return matches


@dataclasses.dataclass
class Explanation:
    """Answer of :func:`explain`: whether ``rule`` matches at ``node`` and, if not, why."""

    node: str
    matched: bool
    failure: Failure | None = None
    match: Match | None = None

    def __str__(self) -> str:
        if self.matched:
            return f"rule matches at node '{self.node}'"
        return f"rule does not match at node '{self.node}': {self.failure}"


def explain(rule: Rule, node: fx.Node, handler: Any = None) -> Explanation:
    """Say why ``rule`` does (or does not) match at ``node``: the first pattern node and
    argument that failed and why, or the validity check or filter that rejected it."""
    anchor = rule.pattern.anchor
    if not rule.pattern.calls_same(anchor, node):
        failure = Failure(
            "wrong_anchor",
            f"the pattern ends in {target_name(anchor)} but {describe(node)} is "
            f"{target_name(node) if node.op.startswith('call') else node.op}",
            anchor.name,
        )
        return Explanation(node.name, False, failure)
    accept = _Acceptance(rule, handler, _always_live)
    solver = _Solver(rule, _always_live, accept, record=True)
    if solver.solve(node) is None:
        return Explanation(node.name, False, solver.failure, accept.match)
    return Explanation(node.name, True, None, accept.match)
