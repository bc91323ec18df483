"""Run a plan on a copy of a captured graph, leaving the original untouched."""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.report import Report


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module with a copy of ``gm``'s graph and ``gm``'s own parameters and buffers.

    Node names and ``meta`` (shallow-copied) are kept, so nodes of the copy can be matched to
    nodes of ``gm`` by name; rewriting the copy never changes ``gm``.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value, type_expr=old_output.type).meta.update(old_output.meta)
    # The codegen carries export's input/output pytree specs; it is never mutated.
    graph.set_codegen(gm.graph._codegen)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def run_on_copy(
    gm: fx.GraphModule, handlers: Sequence[HandlerSpec]
) -> tuple[fx.GraphModule, Report]:
    """Apply the plan ``handlers`` to a copy of ``gm``; return the rewritten copy and report."""
    after = copy_graph_module(gm)
    report = PassManager(handlers).run(after)
    return after, report
