"""Copy a graph module's graph while sharing its parameters, buffers and submodules."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx


def copy_graph_module(
    gm: fx.GraphModule, keep: Callable[[fx.Node], bool] | None = None
) -> fx.GraphModule:
    """A graph module over a copy of ``gm``'s graph (only the nodes ``keep`` accepts, default
    all) that shares ``gm``'s parameters, buffers and submodules.

    Node names and ``meta`` (shallow-copied) are kept, so nodes of the copy can be matched to
    nodes of ``gm`` by name; rewriting the copy never changes ``gm``. The codegen (export's
    input/output pytree specs) is shared: it is never mutated.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if keep is None or keep(node):
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.set_codegen(gm.graph._codegen)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)
