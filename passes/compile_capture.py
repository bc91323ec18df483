"""The compile stage, judged once: Inductor's post-grad graphs of one training step, the
compile-stage handlers checked on them, and the compiled step verified.

``torch.compile`` hands the compile-stage pass one post-grad graph per compiled graph: for
a training step a ``forward`` and a ``backward`` (more on a graph break). :func:`capture_compile`
compiles a copy of a converted graph module with the plan's compile-stage handlers, runs
one forward + backward on the inputs, and keeps each post-grad graph as the handlers got it
(``before``: after Inductor's own passes and the user's pass) and as they left it
(``after``). On each graph the handlers are judged as ``check`` judges the graph stage
(``overlap``, ``order``, ``clobber``); ``no_match`` is judged over all the graphs together
(a handler may rewrite only backward ops); ``numerics`` compares the compiled step's
outputs and gradients with the eager step's. The FX graph cache is bypassed, so that the
graphs are really compiled (a cache hit would skip the pass), and random ops run on their
eager kernels (Inductor's ``fallback_random``), so that a model with dropout draws the same
masks as the eager step it is compared with (``run`` compiles them with Inductor's own RNG).

Cost: one Inductor compile of the forward and the backward (seconds to a minute on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import fx

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ir.rewriter import GraphEditor
from torchgraft.passes.checks import NoMatchCheck
from torchgraft.passes.compile_stage import compile_with_stage
from torchgraft.passes.problems import CheckError, Problem
from torchgraft.passes.report import Report
from torchgraft.passes.stages import stage_names
from torchgraft.passes.verify import verify_stage

if TYPE_CHECKING:
    from torchgraft.passes.manager import PassManager


@dataclasses.dataclass
class CompiledGraph:
    """One post-grad graph of the compiled step."""

    name: str
    """``"forward"`` or ``"backward"`` (with ``_1``, ``_2`` ... for further graphs)."""
    before: fx.GraphModule
    """The graph as the compile-stage handlers got it."""
    after: fx.GraphModule
    """The graph as they left it."""
    report: Report
    """What they did to it: matches, records, and the problems found on it."""


@dataclasses.dataclass
class CompileCapture:
    """What :func:`capture_compile` found."""

    graphs: list[CompiledGraph]
    report: Report
    """Matches of the compile-stage handlers over all graphs, and every problem found."""


def graph_name(gm: fx.GraphModule, taken: Sequence[str]) -> str:
    """``backward`` for a graph with tangent inputs, else ``forward``; suffixed ``_1`` ...
    when ``taken`` already has the name."""
    backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in gm.graph.nodes)
    base = "backward" if backward else "forward"
    count = sum(1 for name in taken if name == base or name.startswith(f"{base}_"))
    return base if count == 0 else f"{base}_{count}"


def capture_compile(
    pm: PassManager,
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    verify: bool = True,
) -> CompileCapture:
    """Compile a copy of ``gm`` (already converted by the earlier stages; not changed, its
    parameters shared) with ``pm``'s compile-stage handlers judged on each post-grad graph,
    run one forward + backward on ``inputs`` (default: random ones), and (``verify``)
    compare that step with ``gm``'s eager step. Raises :class:`CheckError` for a plan with
    problems of its own."""
    if pm.problems:
        raise CheckError(pm.problems)
    graphs: list[CompiledGraph] = []
    report = Report(order=pm.order, stages=stage_names(pm.steps))

    def rewrite(owner: fx.GraphModule) -> Report:
        before = copy_graph_module(owner)
        stage_report = pm.rewrite_stage(owner, "compile", no_match=False, judged=True)
        name = graph_name(owner, [g.name for g in graphs])
        graphs.append(CompiledGraph(name, before, copy_graph_module(owner), stage_report))
        return stage_report

    module = compile_with_stage(
        pm,
        copy_graph_module(gm),
        report,
        rewrite=rewrite,
        options={"fx_graph_cache": False, "fallback_random": True},
    )
    problems = verify_stage(gm, module, pm.stage_steps("compile"), "compiled step", inputs)
    if not verify:
        problems = []
    report.problems += _unmatched(pm, graphs, report) + problems
    return CompileCapture(graphs, report)


def _unmatched(pm: PassManager, graphs: list[CompiledGraph], report: Report) -> list[Problem]:
    """``no_match`` for each non-optional compile-stage handler that rewrote nothing in any
    graph, with the nearest miss in the first graph."""
    if not graphs:
        return []
    check = NoMatchCheck()
    editor = GraphEditor(graphs[0].before.graph)  # only read: nothing is rewritten
    for step in pm.stage_steps("compile"):
        if not report.matches.get(step.name):
            check.after_handler(step, [], editor)
    return check.problems


def check_compile(pm: PassManager, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Report:
    """What ``torchgraft check`` does for the compile stage: convert ``gm`` (a fresh capture)
    in place with the graph stage, then :func:`capture_compile` it on ``inputs``. Returns the
    compile-stage handlers' matches with every problem found."""
    pm.run(gm)
    return capture_compile(pm, gm, inputs).report
