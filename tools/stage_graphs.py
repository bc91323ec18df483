"""The graphs each stage's handlers rewrite, for ``explain``, ``viz`` and ``--dump-ir``.

* ``graph``: the captured graph itself.
* ``joint``: the joint forward + backward graph of one training step of the captured graph
  converted by the plan's graph stage (:class:`~torchgraft.passes.joint.JointModule`),
  as traced, before the joint-stage handlers.
* ``compile``: Inductor's post-grad ``forward`` and ``backward`` graphs of one compiled
  step of that converted graph, as the compile-stage handlers get them
  (:func:`~torchgraft.passes.compile_capture.capture_compile`: one Inductor compile).

The captured graph is not changed (the later stages work on a copy sharing its
parameters). Example::

    for graph in stage_graphs(gm, ["onednn_matmul"], "compile", inputs):
        after, report = run_on_copy(graph.module, ["onednn_matmul"], "compile")
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch
from torch import fx

from torchgraft.handlers.base import STAGES
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.problems import acceptable_kinds

GRAPH_STAGES = tuple(s for s in STAGES if s != "module")
"""Stages whose handlers rewrite a graph (``module`` handlers convert the eager model)."""


@dataclasses.dataclass
class StageGraph:
    """One graph a stage's handlers rewrite."""

    stage: str
    name: str
    """``"graph"``, ``"joint"``, or the post-grad graph's ``"forward"`` / ``"backward"``."""
    module: fx.GraphModule
    """The graph as the stage's first handler gets it."""

    @property
    def label(self) -> str:
        """``"compile backward"``, ``"joint"``, ``"graph"``: for file names and headings."""
        return self.stage if self.name == self.stage else f"{self.stage} {self.name}"


def stage_graphs(
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    stage: str,
    inputs: Sequence[torch.Tensor] | None = None,
) -> list[StageGraph]:
    """The graphs the plan's ``stage`` handlers rewrite (see the module docstring) for the
    captured graph ``gm`` and one step on ``inputs`` (default: random ones)."""
    if stage not in GRAPH_STAGES:
        raise TorchgraftError(
            f"stage {stage!r} has no graph to show; choose one of {', '.join(GRAPH_STAGES)}"
        )
    if stage == "graph":
        return [StageGraph(stage, stage, gm)]
    pm = PassManager(handlers, allow=acceptable_kinds())
    if stage not in pm.stages:
        raise TorchgraftError(
            f"the plan has no handler at stage {stage!r} (its stages: {', '.join(pm.stages)})"
        )
    converted = copy_graph_module(gm)
    pm.run(converted)
    if stage == "joint":
        from torchgraft.passes.joint import JointModule
        from torchgraft.passes.verify import random_inputs

        step = pm.joint_module(converted)
        assert isinstance(step, JointModule)
        step(*(inputs if inputs is not None else random_inputs(gm)))  # traces the joint graph
        assert step.joint_before is not None
        return [StageGraph(stage, "joint", step.joint_before)]
    from torchgraft.passes.compile_capture import capture_compile

    capture = capture_compile(pm, converted, inputs, verify=False)
    return [StageGraph(stage, g.name, g.before) for g in capture.graphs]


def add_stage_argument(
    parser: argparse.ArgumentParser, default: str | None = "graph", shown_default: str = "graph"
) -> None:
    """The ``--stage`` option of ``explain`` and ``viz``."""
    parser.add_argument(
        "--stage",
        choices=GRAPH_STAGES,
        default=default,
        help="the stage whose graph to show: graph (the captured graph), joint (the traced "
        "joint forward+backward graph of one step: an AOTAutograd trace) or compile "
        "(Inductor's post-grad forward and backward graphs: one torch.compile of a step) "
        f"(default {shown_default})",
    )
