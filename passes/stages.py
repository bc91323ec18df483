"""Stages across a plan: each handler runs at its :attr:`~torchgraft.Handler.stage`, in
flow order (:data:`~torchgraft.handlers.base.STAGES`: module → graph → joint → compile).

The run order is stage order first, then declarations and plan order within a stage. A
declaration that contradicts the stage order (a ``graph`` handler declared ``after`` a
``joint`` one) cannot be honoured and is an ``order`` problem. The checks that compare
handlers (overlap, order, clobber) compare handlers of one stage; a plan split by stage
keeps one :class:`~torchgraft.passes.ordering.Ordering` per stage for them. The optimizer
side is checked here too: two handlers claiming one parameter, or two LR schedules, are
``overlap`` problems.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import networkx as nx
import torch
from torch import nn

from torchgraft.handlers.base import STAGES, Handler
from torchgraft.handlers.claims import conflict_message, resolve_claims
from torchgraft.handlers.roles import parameter_roles
from torchgraft.passes.plan import Step
from torchgraft.passes.problems import Problem

if TYPE_CHECKING:
    from torchgraft.passes.ordering import Ordering

FLOW = " -> ".join(STAGES)


def stage_of(step: Step) -> str:
    """The stage a plan step runs at."""
    return type(step.handler).stage


def stage_key(step: Step) -> tuple[int, int]:
    """Sort key of a step: its stage's place in the flow, then its place in the plan."""
    return STAGES.index(stage_of(step)), step.index


def stage_conflicts(graph: nx.DiGraph, steps: dict[str, Step]) -> list[Problem]:
    """``order`` problems for declared edges ``a → b`` (a before b) whose stages run the
    other way round (``a``'s stage comes after ``b``'s in the flow)."""
    problems = []
    for first, then, why in graph.edges(data="why"):
        a, b = steps[first], steps[then]
        if STAGES.index(stage_of(a)) <= STAGES.index(stage_of(b)):
            continue
        problems.append(
            Problem(
                "order",
                (first, then),
                None,
                None,
                b.source or a.source,
                f"{why}, so '{first}' must run before '{then}', but '{first}' runs at stage "
                f"'{stage_of(a)}' and '{then}' at stage '{stage_of(b)}', and stages run in "
                f"flow order ({FLOW}); remove the declaration or change a handler's stage",
            )
        )
    return problems


def split_stages(ordering: Ordering) -> dict[str, Ordering]:
    """One ordering per stage the plan uses (steps in run order, the declaration graph
    restricted to them, no problems), in flow order."""
    parts: dict[str, Ordering] = {}
    for stage in STAGES:
        steps = [s for s in ordering.steps if stage_of(s) == stage]
        if steps:
            names = [s.name for s in steps]
            graph = ordering.graph.subgraph(names).copy()
            parts[stage] = dataclasses.replace(ordering, steps=steps, graph=graph, problems=[])
    return parts


def backward_module_stacks(graph: torch.fx.Graph) -> None:
    """Give each backward node of an AOTAutograd graph (joint, or Inductor's post-grad
    backward) its forward module's FQN: copy ``fwd_nn_module_stack`` to ``nn_module_stack``
    where that is missing, so ``include`` / ``exclude`` / ``where`` filters and provenance
    work on backward nodes as on forward ones."""
    for node in graph.nodes:
        if "nn_module_stack" not in node.meta and "fwd_nn_module_stack" in node.meta:
            node.meta["nn_module_stack"] = node.meta["fwd_nn_module_stack"]


def stage_names(steps: Sequence[Step]) -> dict[str, list[str]]:
    """Stage → handler names in run order, for the stages the plan uses (flow order)."""
    names = {stage: [s.name for s in steps if stage_of(s) == stage] for stage in STAGES}
    return {stage: found for stage, found in names.items() if found}


def optimizer_side(handler: Handler) -> bool:
    """Whether ``handler`` supplies optimizer claims or an LR schedule (overrides
    :meth:`~torchgraft.Handler.optimizer_claims` or :meth:`~torchgraft.Handler.lr_schedule`)."""
    cls = type(handler)
    return (
        cls.optimizer_claims is not Handler.optimizer_claims
        or cls.lr_schedule is not Handler.lr_schedule
    )


def policy_handler(handler: Handler) -> bool:
    """Whether ``handler`` sets activation policies in the joint graph (overrides
    :meth:`~torchgraft.Handler.activation_policy`)."""
    return type(handler).activation_policy is not Handler.activation_policy


def works_without_rules(handler: Handler) -> bool:
    """Whether a rule-less ``handler`` does something a rule count does not show (its own
    checks report when it does nothing): optimizer claims, a schedule, activation policies."""
    return optimizer_side(handler) or policy_handler(handler)


def schedule_problems(steps: Sequence[Step]) -> list[Problem]:
    """``overlap``: more than one handler supplies the LR schedule."""
    owners = [s for s in steps if type(s.handler).lr_schedule is not Handler.lr_schedule]
    if len(owners) < 2:
        return []
    names = [s.name for s in owners]
    return [
        Problem(
            "overlap",
            tuple(names),
            None,
            None,
            owners[1].source,
            f"handlers {', '.join(repr(n) for n in names)} each supply the LR schedule "
            "(lr_schedule); a run has one schedule. Keep one of them (the others can scale "
            "it with lr_multiplier)",
        )
    ]


def claim_problems(steps: Sequence[Step], module: nn.Module) -> list[Problem]:
    """``overlap``: parameters of ``module`` that two handlers claim for their optimizers;
    ``no_match``: a non-optional handler whose claims cover no parameter. Claims may name
    parameters by structural role (:func:`~torchgraft.handlers.roles.parameter_roles`)."""
    if not any(s.handler.optimizer_claims() for s in steps):
        return []  # nothing claims: no need to list the parameters
    named_params = list(module.named_parameters())
    owners, conflicts = resolve_claims(
        [(s.name, s.handler) for s in steps], named_params, parameter_roles(module)
    )
    sources = {s.name: s.source for s in steps}
    problems = [
        Problem("overlap", c.handlers, None, None, sources[c.handlers[1]], conflict_message(c))
        for c in conflicts
    ]
    claimed = {name for name, _ in owners.values()} | {n for c in conflicts for n in c.handlers}
    for step in steps:
        if step.optional or step.name in claimed or not step.handler.optimizer_claims():
            continue
        globs = [g for claim in step.handler.optimizer_claims() for g in claim.params]
        problems.append(
            Problem(
                "no_match",
                (step.name,),
                None,
                None,
                step.source,
                f"handler '{step.name}' claims no parameter for its optimizer (globs {globs}; "
                f"parameters look like {[n for n, _ in named_params[:3]]}). Fix its globs, or "
                f"mark it optional ({{{step.name}: {{optional: true}}}}) if that is expected",
            )
        )
    return problems
