"""Fold the nodes of large graphs into one box per module, keeping chosen modules expanded.

Folding to depth ``d`` puts every node traced ``d`` or more modules deep in its
``nn_module_stack`` into one box for its depth-``d`` module (depth 1: ``layers.0``, depth 2:
``layers.0.attention``). Nodes inside a module matching an ``expand`` glob stay visible, in a
cluster labelled with that module (globs match a dotted sub-path of the FQN, as
``skip_fqns`` does: ``layers.0`` also expands ``model.layers.0``). Graph inputs and the output are always drawn; other
nodes without a module (parameters, constants) go where all their users go. A fold of a
single node is drawn as that node.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from torch import fx

from torchgraft.ir.provenance import module_glob, module_stack


@dataclasses.dataclass(frozen=True)
class Group:
    """A module whose nodes are drawn together: folded into one box, or as a cluster."""

    kind: Literal["fold", "cluster"]
    module: str

    @property
    def id(self) -> str:
        """Graphviz / SVG id of the fold's box or the cluster (never a valid fx node name)."""
        return f"{self.kind}:{self.module}"


def group_nodes(
    graph: fx.Graph, depth: int | None, expand: Sequence[str] = ()
) -> dict[fx.Node, Group | None]:
    """The group each node is drawn in (None: drawn alone); ``depth=None`` folds nothing."""
    if depth is None:
        return dict.fromkeys(graph.nodes)
    if depth < 1:
        raise ValueError(f"fold depth must be 1 or more (or None for no folding), got {depth}")
    groups: dict[fx.Node, Group | None] = {}
    for node in reversed(graph.nodes):
        stack = module_stack(node)
        if stack:
            groups[node] = _module_group(stack, depth, expand)
        elif node.op in ("placeholder", "output"):
            groups[node] = None
        else:
            users = {groups[user] for user in node.users}
            groups[node] = users.pop() if len(users) == 1 else None
    sizes = Counter(groups.values())
    return {
        node: None if group and group.kind == "fold" and sizes[group] == 1 else group
        for node, group in reversed(groups.items())
    }


def _module_group(stack: list[str], depth: int, expand: Sequence[str]) -> Group | None:
    expanded = next((m for m in stack if module_glob(m, list(expand))), None)
    if expanded is not None:
        return Group("cluster", expanded)
    if len(stack) >= depth:
        return Group("fold", stack[depth - 1])
    return None
