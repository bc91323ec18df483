"""An fx graph as Graphviz DOT, and DOT rendered to SVG by the ``dot`` program.

Every fx node drawn alone becomes a Graphviz node whose ``id`` is the fx node name, so the
SVG element ``<g id="linear_3" class="node tg-op ...">`` can be found by tests and scripts;
folded modules become one ``tg-fold`` box whose id is ``fold:<module FQN>``.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping

from torch import fx

from torchgraft.ir.errors import TorchgraftError
from torchgraft.tools.folding import Group
from torchgraft.tools.node_info import is_op, op_label, shape_label

FOLD_FILL = "#e4e4e4"
"""Fill of a folded module box (the share of its nodes no handler touched)."""
_TOOLTIP_MEMBERS = 40
_SHAPES = {"placeholder": "invhouse", "output": "house", "get_attr": "cylinder"}


class GraphvizNotFoundError(TorchgraftError):
    """The Graphviz ``dot`` program is not installed."""


@dataclasses.dataclass
class NodeStyle:
    """How to draw one fx node: the lines of its tooltip, its fill and its SVG classes."""

    details: Mapping[str, str]
    fill: str | None = None
    classes: tuple[str, ...] = ()


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _attrs(**attrs: str) -> str:
    return ", ".join(f"{key}={_quote(value)}" for key, value in attrs.items())


def _tooltip(details: Mapping[str, str]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in details.items())


def _striped(fills: Iterable[str | None]) -> str:
    """A Graphviz striped fill with one stripe per colour, as wide as its share of ``fills``."""
    counts = Counter(fill or FOLD_FILL for fill in fills)
    total = sum(counts.values())
    stripes = [f"{color};{int(1000 * n / total) / 1000}" for color, n in counts.most_common()]
    stripes[-1] = stripes[-1].split(";")[0]  # the last stripe takes the rounding remainder
    return ":".join(stripes)


def _node_statement(node: fx.Node, style: NodeStyle) -> str:
    label = "\n".join(filter(None, (node.name, op_label(node), shape_label(node))))
    attrs = _attrs(
        id=node.name,
        label=label,
        tooltip=_tooltip(style.details),
        shape=_SHAPES.get(node.op, "box"),
        style="filled,rounded" if is_op(node) else "filled",
        fillcolor=style.fill or "white",
        **{"class": " ".join(("tg-op", *style.classes))},
    )
    return f"{_quote(node.name)} [{attrs}]"


def _fold_statement(
    group: Group, members: list[fx.Node], styles: Mapping[fx.Node, NodeStyle]
) -> str:
    ops = [m for m in members if is_op(m)]
    histogram = Counter(op_label(m) for m in ops).most_common(8)
    names = [m.name for m in members]
    listed = ", ".join(names[:_TOOLTIP_MEMBERS])
    if len(names) > _TOOLTIP_MEMBERS:
        listed += f", ... ({len(names) - _TOOLTIP_MEMBERS} more)"
    tooltip = "\n".join(
        [f"module {group.module}: {len(ops)} ops folded"]
        + [f"  {label} x{count}" for label, count in histogram]
        + [f"nodes: {listed}"]
    )
    classes = dict.fromkeys(c for m in members for c in styles[m].classes)
    attrs = _attrs(
        id=group.id,
        label=f"{group.module}\n{len(ops)} ops",
        tooltip=tooltip,
        shape="box",
        style="striped,bold",
        fillcolor=_striped(styles[m].fill for m in members),
        **{"class": " ".join(("tg-fold", *classes))},
    )
    return f"{_quote(group.id)} [{attrs}]"


def to_dot(
    graph: fx.Graph, styles: Mapping[fx.Node, NodeStyle], groups: Mapping[fx.Node, Group | None]
) -> str:
    """DOT source of ``graph``: folds drawn as one box, clusters boxed, edges deduplicated."""

    def unit(node: fx.Node) -> str:
        group = groups[node]
        return group.id if group is not None and group.kind == "fold" else node.name

    members: dict[Group | None, list[fx.Node]] = {}
    for node in graph.nodes:
        members.setdefault(groups[node], []).append(node)
    lines = [
        "digraph G {",
        '  graph [rankdir="TB", nodesep="0.25", ranksep="0.35", fontname="Helvetica"];',
        '  node [fontname="Helvetica", fontsize="10", margin="0.08,0.03"];',
        '  edge [color="#777777", arrowsize="0.6"];',
    ]
    for group, nodes in members.items():
        if group is None:
            lines.extend(f"  {_node_statement(n, styles[n])};" for n in nodes)
        elif group.kind == "fold":
            lines.append(f"  {_fold_statement(group, nodes, styles)};")
        else:
            lines.append(f"  subgraph {_quote('cluster_' + group.module)} {{")
            lines.append(f"    graph [{_attrs(id=group.id, label=group.module, style='dashed')}];")
            lines.extend(f"    {_node_statement(n, styles[n])};" for n in nodes)
            lines.append("  }")
    edges = dict.fromkeys(
        (unit(source), unit(node))
        for node in graph.nodes
        for source in node.all_input_nodes
        if unit(source) != unit(node)
    )
    lines.extend(f"  {_quote(a)} -> {_quote(b)};" for a, b in edges)
    lines.append("}")
    return "\n".join(lines)


def render_svg(dot_source: str) -> str:
    """Run Graphviz ``dot -Tsvg`` on ``dot_source`` and return the SVG text."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizNotFoundError(
            "Graphviz's 'dot' program is not on PATH; install the Debian/Ubuntu package "
            "'graphviz' (apt-get install graphviz) or Graphviz from https://graphviz.org/download/"
        )
    result = subprocess.run(
        [dot, "-Tsvg"], input=dot_source, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise TorchgraftError(f"Graphviz 'dot' failed (exit {result.returncode}): {result.stderr}")
    return result.stdout
