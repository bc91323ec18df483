"""Insert and erase fx nodes in bulk: ``Graph.create_node`` / ``Graph.erase_node``'s
bookkeeping without their per-call checks.

A run creates and erases a few nodes per match, thousands in all, and these two calls
were most of what a replaced node cost. ``create_node`` walks every argument with pytree
looking for raw SymInts (a template's nodes were built by ``create_node`` when traced, so
their arguments were checked then) and is placed through an ``inserting_before``
context; ``erase_node`` re-checks users, graph and state and sets ``_erased`` through
``Node.__setattr__``, which probes the find_nodes table. The effects are fx's own: unique
names, the owning module's create / erase hooks, the find_nodes table, the node count,
the linked list and the inputs' ``users``. ``tests/test_ir_node_edit.py`` compares them
with ``create_node`` / ``erase_node`` on the installed torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx


class Inserter:
    """Inserts nodes into one graph: the graph's namespace, hooks and ``find_nodes`` table
    entries are looked up once, not per node."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._namespace = graph._graph_namespace
        self._hooks = getattr(graph.owning_module, "_create_node_hooks", None)
        self._table = graph._find_nodes_lookup_table
        self._buckets: dict[tuple[str, int], dict[fx.Node, None]] = {}
        """The table's entry per (op, target), found by the target's id: hashing an
        OpOverload runs Python code."""

    def insert(
        self,
        before: fx.Node,
        op: str,
        target: Any,
        args: tuple,
        kwargs: dict[str, Any],
        name: str,
        meta: dict[str, Any],
    ) -> fx.Node:
        """A new node ``op(target)(*args, **kwargs)`` right before ``before``, named ``name``
        (made unique as ``create_node`` does), with ``meta``."""
        graph, namespace = self.graph, self._namespace
        name = namespace.create_name(name, None)
        node = fx.Node(graph, name, op, target, args, kwargs)
        node.meta.update(meta)
        if self._hooks:
            for hook in self._hooks:
                hook(node)
        namespace.associate_name_with_obj(name, node)
        before.prepend(node)
        ident = (op, id(target))
        bucket = self._buckets.get(ident)
        if bucket is None:
            bucket = self._buckets[ident] = self._table.table[self._table._key(node)]
        bucket[node] = None
        graph._len += 1
        return node


def erase_nodes(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase ``nodes`` of ``graph``, in the given order; each must have no users left when
    its turn comes (users before the nodes they use)."""
    hooks = getattr(graph.owning_module, "_erase_node_hooks", None) or ()
    table = graph._find_nodes_lookup_table
    buckets: dict[tuple[str, int], dict[fx.Node, None]] = {}
    """The find_nodes table's entry per (op, target): looked up by the target's id, as
    hashing an OpOverload runs Python code."""
    for node in nodes:
        if node.users:
            raise RuntimeError(f"cannot erase node '{node.name}': it still has users {node.users}")
        for hook in hooks:
            hook(node)
        ident = (node.op, id(node.target))
        bucket = buckets.get(ident)
        if bucket is None:
            bucket = buckets[ident] = table.table[table._key(node)]
        del bucket[node]
        node._remove_from_list()
        object.__setattr__(node, "_erased", True)  # as erase_node, minus the table probe
        graph._len -= 1
        # Inputs become None, as in erase_node, which drops the node from their users.
        node._update_args_kwargs(fx.map_arg(node._args, _none), fx.map_arg(node._kwargs, _none))


def _none(node: fx.Node) -> None:
    return None
