"""Run a plan on a copy of a captured graph, leaving the original untouched."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.report import Report


def run_on_copy(
    gm: fx.GraphModule, handlers: Sequence[HandlerSpec]
) -> tuple[fx.GraphModule, Report]:
    """Apply the plan ``handlers`` to a copy of ``gm``; return the rewritten copy and report."""
    after = copy_graph_module(gm)
    report = PassManager(handlers).run(after)
    return after, report
