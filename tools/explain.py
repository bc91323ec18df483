"""Why did a rule (not) match? For each candidate node, the failing pattern node, argument,
predicate or filter, with a hint the user can act on.

Example::

    for explanation in explain_plan(gm, "float8", rule="linear", module="layers.0.*"):
        print(format_explanation(explanation))

Command line: ``torchgraft explain CONFIG --handler NAME [--rule R] [--module GLOB | --node N]
[--stage graph|joint|compile]`` (default: the handler's own stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence

import torch
from torch import fx

from torchgraft.handlers.base import Handler
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.matcher import explain, find_matches
from torchgraft.ir.pattern import target_name
from torchgraft.ir.provenance import module_fqn, module_glob, user_source
from torchgraft.ir.rule import Rule
from torchgraft.passes.manager import HandlerSpec, PassManager, instantiate
from torchgraft.passes.report import Report
from torchgraft.tools.graph_copy import run_on_copy
from torchgraft.tools.stage_graphs import add_stage_argument, stage_graphs

# A hint per failure kind of the engine (torchgraft.ir.matcher.FAILURE_KINDS).
HINTS: dict[str, str] = {
    "wrong_anchor": (
        "this node computes another op than the pattern's last one; pick a node with the "
        "anchor's op, or check the capture level (export gives aten ops, symbolic_trace torch ones)"
    ),
    "literal_mismatch": (
        "declare the literal free by making it a pattern parameter (check its value in where= "
        "if only some values are allowed)"
    ),
    "list_mismatch": (
        "the graph's list differs in length or kind; make the whole list a pattern parameter"
    ),
    "wrong_op": (
        "the graph computes this input with another op; write the pattern with the op the "
        "captured graph has (see `torchgraft viz` or --dump-ir), or add a rule for this variant"
    ),
    "argument_count": ("call the op in the pattern with the same arguments as the graph does"),
    "annotation_mismatch": (
        "the parameter's type annotation rejects this value; widen it (e.g. "
        "`torch.Tensor | float`) or remove it"
    ),
    "parameter_bound_twice": (
        "the pattern uses one parameter where the graph has two different values; use two "
        "parameters (and compare them in where= if they must be equal)"
    ),
    "pattern_shares_node": (
        "the pattern reuses one op result where the graph computes it twice; write the pattern "
        "with two separate calls"
    ),
    "graph_shares_node": (
        "the graph reuses one node where the pattern has two separate ops; call the op once in "
        "the pattern and use its result twice"
    ),
    "output_not_found": (
        "another output of the pattern was not found among the users of the matched nodes; "
        "compare that op and its arguments with the graph"
    ),
    "parameter_binds_pattern_op": (
        "a parameter and a pattern op would bind the same node; restructure the pattern so "
        "every graph node is matched once"
    ),
    "internal_node_used_outside": (
        "an intermediate value of the match has other users, so it cannot be removed; extend "
        "the pattern to cover that user, or end the pattern at that value (make it a parameter)"
    ),
    "include_glob": ("the rule's include= globs do not cover this module; add a glob for it"),
    "exclude_glob": ("the rule's exclude= globs reject this module; narrow or remove that glob"),
    "handler_reject": (
        "the handler's reject() refused this match, usually because of an option such as "
        "skip_fqns; change the handler's options in the config"
    ),
    "where_predicate": (
        "the rule's where= predicate returned False; it sees the match as m (m['x'].shape, "
        "m['x'].dtype, m.module_fqn): check which condition fails for this node"
    ),
}
HINTS["filter_raised"] = (
    "a filter raised; fix the rule's where= predicate or the handler's reject()"
)


@dataclasses.dataclass
class NodeExplanation:
    """Whether a rule matches at one node and, if not, why and what to do about it."""

    node: str
    module: str
    source: str | None
    kind: str
    """``"match"``, ``"overlap"`` (matches, but an earlier overlapping match wins), or the
    failure kind (``"literal_mismatch"``, ``"where_predicate"``, ... see
    :data:`torchgraft.ir.matcher.FAILURE_KINDS`, and ``"filter_raised"``)."""
    reason: str | None = None
    """The engine's words: the failing pattern node and argument, and what it found."""
    hint: str | None = None

    @property
    def matched(self) -> bool:
        """The pattern and every filter accept this node (rewritten unless it overlaps)."""
        return self.kind in ("match", "overlap")


@dataclasses.dataclass
class RuleExplanation:
    """The candidates of one rule and the explanation at each."""

    handler: str
    rule: str
    location: str
    anchor: str
    """The op the pattern ends in; its nodes are the candidates."""
    nodes: list[NodeExplanation]


def _winners(graph: fx.Graph, rule: Rule, handler: Handler) -> dict[fx.Node, set[fx.Node]] | None:
    """Anchor → nodes of each match a run rewrites; None if a filter raises (the run would
    fail, and each candidate's explanation says where)."""
    try:
        return {m.anchor: set(m.replaced) for m in find_matches(graph, rule, handler)}
    except Exception:
        return None


def _explain_node(
    rule: Rule, node: fx.Node, handler: Handler, winners: dict[fx.Node, set[fx.Node]] | None
) -> NodeExplanation:
    """Why ``rule`` does or does not match at ``node``; ``winners`` as :func:`_winners`."""

    def result(kind: str, reason: str | None = None, hint: str | None = None) -> NodeExplanation:
        return NodeExplanation(node.name, module_fqn(node), user_source(node), kind, reason, hint)

    try:
        answer = explain(rule, node, handler)
    except Exception as exc:  # a where= predicate or reject() that raises
        return result("filter_raised", f"{type(exc).__name__}: {exc}", HINTS["filter_raised"])
    if answer.failure is not None:
        kind = answer.failure.kind
        return result(kind, str(answer.failure), HINTS[kind])
    if winners is None or node in winners:
        return result("match")
    first = next(a for a, nodes in winners.items() if not nodes.isdisjoint(answer.match.replaced))
    return result(
        "overlap",
        f"its nodes overlap the match at '{first.name}', which comes first in graph order",
        "only one of overlapping matches is rewritten; this node stays as it is",
    )


def _select_rules(handler: Handler, rule: str | None) -> list[Rule]:
    rules = handler.rules()
    if rule is None:
        return rules
    chosen = [r for r in rules if r.name == rule]
    if not chosen:
        names = [r.name for r in rules]
        close = difflib.get_close_matches(rule, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TorchgraftError(
            f"handler '{handler.display_name}' has no rule {rule!r}{hint} (its rules: {names})"
        )
    return chosen


def _find_node(graph: fx.Graph, name: str, report: Report | None) -> fx.Node:
    nodes = {n.name: n for n in graph.nodes}
    if name in nodes:
        return nodes[name]
    replaced_by = next((r for r in report.records if name in r.replaced), None) if report else None
    if replaced_by is not None:
        raise TorchgraftError(
            f"node '{name}' was replaced by handler '{replaced_by.handler}' rule "
            f"'{replaced_by.rule}', which runs earlier in the plan"
        )
    close = difflib.get_close_matches(name, nodes, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise TorchgraftError(f"the graph has no node '{name}'{hint}")


def _in_module(node: fx.Node, glob: str) -> bool:
    """``glob`` matches a dotted sub-path of the node's module FQN (as ``skip_fqns`` does):
    ``layers.0`` selects every node inside ``model.layers.0``."""
    return module_glob(module_fqn(node), [glob]) is not None


def explain_plan(
    gm: fx.GraphModule,
    handler: HandlerSpec,
    *,
    rule: str | None = None,
    module: str | None = None,
    node: str | None = None,
    earlier: Sequence[HandlerSpec] = (),
    stage: str = "graph",
) -> list[RuleExplanation]:
    """Explain each rule of ``handler`` (or only ``rule``) at each candidate node.

    Candidates are the nodes whose op is the pattern's anchor (its last op), restricted to
    nodes inside a module matching the FQN glob ``module``; or just the node named ``node``,
    whatever its op. The graph is ``gm`` after the ``earlier`` handlers of the plan, applied
    to a copy (``gm`` is not changed), i.e. what ``handler`` sees when the plan runs. ``gm``
    is a graph of ``stage`` (:func:`~torchgraft.tools.stage_graphs.stage_graphs`: the
    captured graph, a joint graph, an Inductor post-grad graph); the earlier handlers of
    that stage are applied to it.
    """
    if module is not None and node is not None:
        raise TorchgraftError("explain takes a module glob or a node name, not both")
    handler = instantiate(handler)
    report = None
    if earlier:
        gm, report = run_on_copy(gm, earlier, stage)
    graph = gm.graph
    chosen = _find_node(graph, node, report) if node is not None else None
    explanations = []
    for r in _select_rules(handler, rule):
        anchor = r.pattern.anchor
        if chosen is not None:
            candidates = [chosen]
        else:
            candidates = r.pattern.candidates(graph)
            if module is not None:
                candidates = [c for c in candidates if _in_module(c, module)]
        winners = _winners(graph, r, handler)
        nodes = [_explain_node(r, c, handler, winners) for c in candidates]
        explanations.append(
            RuleExplanation(handler.display_name, r.name, r.location, target_name(anchor), nodes)
        )
    return explanations


_VERDICTS = {"match": "matches", "overlap": "matches, but is not rewritten (overlap)"}


def format_explanation(explanation: RuleExplanation) -> str:
    """Readable text: one header per rule, then one entry per candidate node."""
    e = explanation
    rewritten = sum(n.kind == "match" for n in e.nodes)
    lines = [
        f"handler '{e.handler}', rule '{e.rule}' ({e.location}): pattern ends in {e.anchor}; "
        f"{len(e.nodes)} candidate node(s), {rewritten} rewritten"
    ]
    if not e.nodes:
        lines.append(f"  no node computes {e.anchor} (in the chosen modules)")
    for n in e.nodes:
        module = f" [{n.module}]" if n.module else ""
        verdict = _VERDICTS.get(n.kind, "does not match: " + n.kind.replace("_", " "))
        lines.append(f"  {n.node}{module}: {verdict}")
        details = [("why", n.reason), ("hint", n.hint)]
        if n.kind != "match":
            details.append(("source", n.source))
        lines.extend(f"      {label}: {value}" for label, value in details if value)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchgraft explain`` (the CLI adds the CONFIG argument)."""
    parser.add_argument("--handler", required=True, help="handler to explain (a name in the plan)")
    parser.add_argument("--rule", help="only this rule of the handler (default: all its rules)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--module", metavar="GLOB", help="only candidates inside these modules")
    where.add_argument("--node", metavar="NAME", help="only this node (of any op)")
    add_stage_argument(parser, default=None, shown_default="the handler's own stage")


def main(
    args: argparse.Namespace,
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    inputs: Sequence[torch.Tensor] | None = None,
) -> int:
    """Run ``torchgraft explain`` on a captured graph and the config's handlers; exit status.

    A handler of the plan is explained with its configured options on the graph the earlier
    handlers of its stage leave; a handler not in the plan, with default options on the
    stage's graph before the plan's handlers of that stage. The stage is ``args.stage``,
    by default the handler's own; for ``joint`` and ``compile`` the plan's graph stage
    converts ``gm`` first and one step on ``inputs`` gives the graphs
    (:func:`~torchgraft.tools.stage_graphs.stage_graphs`), each explained in turn.
    """
    plan = PassManager(handlers).handlers
    names = [h.display_name for h in plan]
    if args.handler in names:
        index = names.index(args.handler)
        handler, earlier = plan[index], plan[:index]
    else:
        print(
            f"note: '{args.handler}' is not in the plan {names}; explaining it with default "
            "options before the plan's handlers of its stage"
        )
        handler, earlier = instantiate(args.handler), []
    stage = args.stage or type(handler).stage
    if stage == "module":
        raise TorchgraftError(
            f"handler '{args.handler}' runs at stage 'module' (it converts the eager model and "
            "has no rules to explain); its conversion is in the captured graph"
        )
    graph_plan = handlers if args.handler in names else [*handlers, handler]
    graphs = stage_graphs(gm, graph_plan, stage, inputs)
    for graph in graphs:
        explanations = explain_plan(
            graph.module,
            handler,
            rule=args.rule,
            module=args.module,
            node=args.node,
            earlier=earlier,
            stage=stage,
        )
        if len(graphs) > 1 or stage != "graph":
            print(f"== {graph.label} graph ({len(graph.module.graph.nodes)} nodes) ==")
        print("\n\n".join(format_explanation(e) for e in explanations))
    return 0
