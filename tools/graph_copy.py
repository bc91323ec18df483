"""Run a plan on a copy of a captured graph, leaving the original untouched."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.problems import CheckError, acceptable_kinds
from torchgraft.passes.report import Report


def run_on_copy(
    gm: fx.GraphModule, handlers: Sequence[HandlerSpec], stage: str = "graph"
) -> tuple[fx.GraphModule, Report]:
    """Apply the plan ``handlers`` to a copy of ``gm``; return the rewritten copy and report.

    ``stage`` says which of the plan's handlers run and how: ``"graph"`` (default) runs the
    graph stage on a captured graph, with every check; ``"joint"`` / ``"compile"`` apply that
    stage's handlers to a graph of that stage (a traced joint graph, an Inductor post-grad
    graph; see :mod:`torchgraft.tools.stage_graphs`) with the checks that compare handlers.
    The tools show what a plan does even when the checks find problems: every acceptable
    kind is allowed here, and the report lists what was found (``report.problems``)."""
    after = copy_graph_module(gm)
    pm = PassManager(handlers, allow=acceptable_kinds())
    if stage == "graph":
        return after, pm.run(after)
    if pm.problems:
        raise CheckError(pm.problems)
    report = pm.rewrite_stage(after, stage, judged=True)
    after.recompile()
    return after, report
