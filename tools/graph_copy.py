"""Run a plan on a copy of a captured graph, leaving the original untouched."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.problems import acceptable_kinds
from torchgraft.passes.report import Report


def run_on_copy(
    gm: fx.GraphModule, handlers: Sequence[HandlerSpec]
) -> tuple[fx.GraphModule, Report]:
    """Apply the plan ``handlers`` to a copy of ``gm``; return the rewritten copy and report.

    The tools show what a plan does even when the checks find problems: every acceptable
    kind is allowed here, and the report lists what was found (``report.problems``)."""
    after = copy_graph_module(gm)
    report = PassManager(handlers, allow=acceptable_kinds()).run(after)
    return after, report
