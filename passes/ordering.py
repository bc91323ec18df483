"""The order of a plan: a DiGraph of its handlers, sorted stably w.r.t. the plan as written.

An edge ``a → b`` means "a runs before b". Edges come only from declarations:
``b.requires`` / ``b.after`` naming ``a``, or ``a.before`` naming ``b``; a ``requires``
naming a handler that is not in the plan is a ``missing_requirement`` problem, while
``after`` / ``before`` naming an absent handler are ignored. The order in which the user
listed the handlers creates no edge: it breaks ties, so the sorted order keeps the
user's order wherever the declarations allow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import networkx as nx

from torchgraft.passes.plan import Step
from torchgraft.passes.problems import Problem
from torchgraft.passes.stages import stage_conflicts, stage_key


@dataclasses.dataclass
class Ordering:
    """The sorted plan, its constraint graph and what is wrong with the declarations."""

    steps: list[Step]
    """The plan's steps in run order (the plan as written when there is a cycle)."""
    graph: nx.DiGraph
    """Handler names; an edge ``a → b`` (attribute ``why``) says ``a`` runs before ``b``."""
    problems: list[Problem]

    @property
    def names(self) -> list[str]:
        return [step.name for step in self.steps]

    def declared(self, first: str, then: str) -> bool:
        """Whether a declaration puts ``first`` directly before ``then``."""
        return self.graph.has_edge(first, then)

    def constrained(self, a: str, b: str) -> bool:
        """Whether the declarations order ``a`` and ``b`` (directly or transitively)."""
        return nx.has_path(self.graph, a, b) or nx.has_path(self.graph, b, a)


def order_plan(steps: Sequence[Step]) -> Ordering:
    """Sort ``steps`` by stage (:mod:`~torchgraft.passes.stages`), then by their
    declarations, ties broken by position in the plan."""
    graph = nx.DiGraph()
    for step in steps:
        graph.add_node(step.name, index=step.index)
    problems = []
    for step in steps:
        cls = type(step.handler)
        for name in cls.requires:
            if name in graph:
                _constrain(graph, name, step.name, f"'{step.name}' requires '{name}'")
            else:
                problems.append(
                    Problem(
                        "missing_requirement",
                        (step.name,),
                        None,
                        None,
                        step.source,
                        f"handler '{step.name}' requires '{name}', which is not in the plan; "
                        f"add '{name}' to the plan",
                    )
                )
        for name in cls.after:
            if name in graph:
                _constrain(graph, name, step.name, f"'{step.name}' declares after=('{name}',)")
        for name in cls.before:
            if name in graph:
                _constrain(graph, step.name, name, f"'{step.name}' declares before=('{name}',)")
    by_name = {step.name: step for step in steps}
    cycles = _cycles(graph, by_name) + stage_conflicts(graph, by_name)
    if cycles:
        return Ordering(sorted(steps, key=stage_key), graph, problems + cycles)
    order = nx.lexicographical_topological_sort(graph, key=lambda n: stage_key(by_name[n]))
    return Ordering([by_name[name] for name in order], graph, problems)


def _constrain(graph: nx.DiGraph, first: str, then: str, why: str) -> None:
    if graph.has_edge(first, then):
        graph.edges[first, then]["why"] += f"; {why}"
    else:
        graph.add_edge(first, then, why=why)


def _cycles(graph: nx.DiGraph, steps: dict[str, Step]) -> list[Problem]:
    """One problem per strongly connected group of handlers that must precede each other."""
    problems = []
    components = sorted(
        nx.strongly_connected_components(graph),
        key=lambda c: min(graph.nodes[n]["index"] for n in c),
    )
    for component in components:
        first = min(component, key=lambda n: graph.nodes[n]["index"])
        if len(component) == 1 and not graph.has_edge(first, first):
            continue
        cycle = nx.find_cycle(graph.subgraph(component), source=first)
        members = tuple(edge[0] for edge in cycle)
        path = " -> ".join((*members, members[0]))
        reasons = "; ".join(graph.edges[edge]["why"] for edge in cycle)
        problems.append(
            Problem(
                "cycle",
                members,
                None,
                None,
                steps[members[0]].source,
                f"the order declarations form a cycle {path} ({reasons}); remove one of them",
            )
        )
    return problems
