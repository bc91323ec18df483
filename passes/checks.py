"""The plan checks: ``overlap`` and ``unmatched_filter`` (static, before the run) and the observers that watch a
dry run handler by handler: ``order``, ``clobber`` and ``no_match``.

An observer's :meth:`~Observer.after_handler` is called after each handler has applied
its rules, while the rewrite is still one open transaction: replaced nodes are retired
(``editor.is_live`` is False) but not yet erased.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import fx

from torchgraft.ir.matcher import explain, find_matches
from torchgraft.ir.pattern import target_name
from torchgraft.ir.provenance import (
    META_KEY,
    describe,
    graph_module_fqns,
    module_fqn,
    module_glob,
    user_source,
)
from torchgraft.ir.rewriter import GraphEditor, MatchRecord
from torchgraft.ir.rule import Match, Rule
from torchgraft.ir.unify import unifiable_nodes
from torchgraft.passes.ordering import Ordering
from torchgraft.passes.plan import Step
from torchgraft.passes.problems import Problem, error_problem
from torchgraft.passes.stages import works_without_rules


class Observer(Protocol):
    """Watches a run handler by handler and collects problems."""

    problems: list[Problem]

    def after_handler(self, step: Step, records: list[MatchRecord], editor: GraphEditor) -> None:
        """Called once per handler, in run order, with the matches it rewrote."""


def _matches(
    graph: fx.Graph, step: Step, rule: Rule, is_live: Callable[[fx.Node], bool], when: str
) -> list[Match] | Problem:
    """The rule's matches, or the problem if one of its filters raises."""
    try:
        return find_matches(graph, rule, step.handler, is_live)
    except Exception as exc:  # a user's where= / reject() raising
        return error_problem(exc, step.name, rule.name, when)


def _more(count: int) -> str:
    return f" (and {count - 1} more)" if count > 1 else ""


def find_overlaps(graph: fx.Graph, ordering: Ordering) -> list[Problem]:
    """``overlap``: rules of two handlers that nothing orders, both matching one node.

    A pair of rules is a candidate only if their patterns unify
    (:func:`~torchgraft.ir.unify.unifiable_nodes`); it is reported only if their matches
    on ``graph`` (filters applied) share a node.
    """
    problems: list[Problem] = []
    matched: dict[tuple[str, str], dict[fx.Node, None]] = {}

    def nodes(step: Step, rule: Rule) -> dict[fx.Node, None]:
        key = (step.name, rule.name)
        if key not in matched:
            found = _matches(graph, step, rule, lambda n: True, "on the captured graph")
            if isinstance(found, Problem):
                problems.append(found)
                found = []
            matched[key] = {n: None for m in found for n in m.nodes.values()}
        return matched[key]

    steps = ordering.steps
    for i, a in enumerate(steps):
        for b in steps[i + 1 :]:
            if ordering.constrained(a.name, b.name):
                continue
            for ra in a.handler.rules():
                for rb in b.handler.rules():
                    if not unifiable_nodes(ra, rb):
                        continue
                    in_b = nodes(b, rb)
                    shared = [n for n in nodes(a, ra) if n in in_b]
                    if shared:
                        problems.append(_overlap(a, ra, b, rb, shared))
    return problems


def _overlap(a: Step, ra: Rule, b: Step, rb: Rule, shared: list[fx.Node]) -> Problem:
    node = shared[0]
    return Problem(
        "overlap",
        (a.name, b.name),
        f"{ra.name} / {rb.name}",
        node.name,
        user_source(node),
        f"rules '{a.name}.{ra.name}' and '{b.name}.{rb.name}' both match node '{node.name}' "
        f"in module '{module_fqn(node)}'{_more(len(shared))}, and no declaration orders "
        f"'{a.name}' and '{b.name}': which one rewrites it depends on the plan order. Declare "
        f"it (after = ('{a.name}',) on '{b.name}', or the reverse) or narrow a rule with "
        "include / exclude / where",
    )


def find_unmatched_filters(graph: fx.Graph, steps: Sequence[Step]) -> list[Problem]:
    """``unmatched_filter``: a module FQN glob of a handler that matches no module of the
    graph (a renamed module leaves a ``skip_fqns`` entry pointing at nothing, and the
    module it meant is silently converted). Each problem has a did-you-mean over the
    graph's module FQNs."""
    filters = [(step, flt) for step in steps for flt in step.handler.module_filters()]
    if not filters:
        return []
    fqns = graph_module_fqns(graph)
    names = sorted({*fqns, *(fqn.rsplit(".", 1)[-1] for fqn in fqns)})
    problems = []
    for step, flt in filters:
        for glob in flt.globs:
            if flt.sub_path:
                hit = any(module_glob(fqn, [glob]) for fqn in fqns)
            else:
                hit = any(fnmatch.fnmatchcase(fqn, glob) for fqn in fqns)
            if hit:
                continue
            close = difflib.get_close_matches(glob, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            problems.append(
                Problem(
                    "unmatched_filter",
                    (step.name,),
                    flt.rule,
                    None,
                    step.source,
                    f"handler '{step.name}' {flt.name} glob {glob!r} matches no module of "
                    f"the graph{hint} (modules: {_fqn_summary(fqns)})",
                )
            )
    return problems


def _fqn_summary(fqns: list[str], limit: int = 8) -> str:
    shown = ", ".join(fqns[:limit])
    return shown + (f", ... ({len(fqns)} in all)" if len(fqns) > limit else "")


def _created_by(node: fx.Node, handler: str) -> bool:
    return node.meta.get(META_KEY, {}).get("handler") == handler


class OrderCheck:
    """``order``: after handler X ran, an earlier handler's rule matches nodes X created,
    so it would rewrite them had it run after X. Not reported when a declaration puts the
    earlier handler before X on purpose."""

    def __init__(self, ordering: Ordering) -> None:
        self.ordering = ordering
        self.done: list[Step] = []
        self.problems: list[Problem] = []

    def after_handler(self, step: Step, records: list[MatchRecord], editor: GraphEditor) -> None:
        if records:
            for earlier in self.done:
                if not self.ordering.constrained(earlier.name, step.name):
                    self._check(earlier, step, editor)
        self.done.append(step)

    def _check(self, earlier: Step, step: Step, editor: GraphEditor) -> None:
        for rule in earlier.handler.rules():
            found = _matches(
                editor.graph, earlier, rule, editor.is_live, f"on the graph after '{step.name}'"
            )
            if isinstance(found, Problem):
                self.problems.append(found)
                continue
            hits = [m for m in found if any(_created_by(n, step.name) for n in m.nodes.values())]
            if not hits:
                continue
            anchor = hits[0].anchor
            made = next(n for n in hits[0].nodes.values() if _created_by(n, step.name))
            self.problems.append(
                Problem(
                    "order",
                    (earlier.name, step.name),
                    rule.name,
                    anchor.name,
                    user_source(anchor),
                    f"rule '{earlier.name}.{rule.name}' matches node '{anchor.name}' "
                    f"({target_name(anchor)}){_more(len(hits))} made of nodes that "
                    f"'{step.name}' creates (rule '{made.meta[META_KEY]['rule']}'), but "
                    f"'{earlier.name}' runs before '{step.name}' and never sees them. List "
                    f"'{earlier.name}' after '{step.name}' or declare after = ('{step.name}',) "
                    f"on '{earlier.name}'",
                )
            )


class ClobberCheck:
    """``clobber``: a handler replaced nodes that an earlier handler created, and neither
    declared that order (``after`` / ``requires`` on the later one, ``before`` on the
    earlier one)."""

    def __init__(self, ordering: Ordering) -> None:
        self.ordering = ordering
        self.problems: list[Problem] = []

    def after_handler(self, step: Step, records: list[MatchRecord], editor: GraphEditor) -> None:
        clobbered: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for record in records:
            for name, provenance in record.overwrote.items():
                earlier = provenance["handler"]
                if earlier != step.name and not self.ordering.declared(earlier, step.name):
                    clobbered.setdefault((earlier, record.rule), []).append(
                        (name, provenance["rule"])
                    )
        if not clobbered:
            return
        by_name = {n.name: n for n in editor.graph.nodes}  # retired nodes are still there
        for (earlier, rule), hits in clobbered.items():
            name, earlier_rule = hits[0]
            node = by_name.get(name)
            self.problems.append(
                Problem(
                    "clobber",
                    (earlier, step.name),
                    rule,
                    name,
                    user_source(node) if node is not None else None,
                    f"rule '{step.name}.{rule}' rewrote node '{name}'{_more(len(hits))}, which "
                    f"'{earlier}' created (rule '{earlier_rule}'), undoing part of its "
                    f"conversion. If that is intended, declare after = ('{earlier}',) on "
                    f"'{step.name}'",
                )
            )


class NoMatchCheck:
    """``no_match``: a handler that is not optional rewrote nothing. The problem says, for
    each rule, the nearest miss: no node with the pattern's op, or why the first one failed."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def after_handler(self, step: Step, records: list[MatchRecord], editor: GraphEditor) -> None:
        if (
            records
            or step.optional
            or (not step.handler.rules() and works_without_rules(step.handler))
        ):
            return  # claims, schedules and activation policies are checked where they apply
        reasons, near = [], None
        for rule in step.handler.rules():
            anchor = rule.pattern.anchor
            candidates = [n for n in rule.pattern.candidates(editor.graph) if editor.is_live(n)]
            if not candidates:
                reasons.append(f"rule '{rule.name}': the graph has no {target_name(anchor)} node")
                continue
            explanation = explain(rule, candidates[0], step.handler)
            reasons.append(
                f"rule '{rule.name}': {len(candidates)} {target_name(anchor)} node(s), none "
                f"matches; at {describe(candidates[0])}: {explanation.failure}"
            )
            near = near or (rule.name, candidates[0])
        rule_name, node = near if near else (None, None)
        self.problems.append(
            Problem(
                "no_match",
                (step.name,),
                rule_name,
                node.name if node is not None else None,
                user_source(node) if node is not None else step.source,
                f"handler '{step.name}' rewrote nothing; "
                + "; ".join(reasons or ["it declares no rules"])
                + f". Mark it optional ({{{step.name}: {{optional: true}}}}) if that is expected",
            )
        )
