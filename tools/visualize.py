"""See what a plan did: the graph before and after, as SVG and one self-contained HTML page.

Example::

    gm = tg.capture(model, (tokens,))
    rendering = visualize_plan(gm, ["float8"], "viz/")
    rendering.html          # viz/index.html: open it in a browser

``before.svg`` and ``after.svg`` (Graphviz ``dot``) are written next to the page. Nodes a
handler created are filled with the handler's colour in the "after" graph; the nodes each
rule matched are filled with it in the "before" graph. Large graphs are folded by module
(:mod:`torchgraft.tools.folding`). Command line: ``torchgraft viz CONFIG --out DIR
[--stage graph|joint|compile]``: a later stage's graphs (the joint graph, Inductor's post-grad
forward and backward) get a page each, before and after that stage's handlers.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import fx

from torchgraft.ir.provenance import META_KEY
from torchgraft.ir.rewriter import MatchRecord
from torchgraft.passes.manager import HandlerSpec, op_histogram
from torchgraft.passes.report import Report
from torchgraft.tools import ir_dump
from torchgraft.tools.folding import Group, group_nodes
from torchgraft.tools.graph_copy import run_on_copy
from torchgraft.tools.graph_dot import NodeStyle, render_svg, to_dot
from torchgraft.tools.html_page import LegendEntry, Panel, build_page
from torchgraft.tools.node_info import details, is_op
from torchgraft.tools.stage_graphs import add_stage_argument, stage_graphs

DEFAULT_FOLD_DEPTH: int | None = 2
"""Fold nodes by module at this ``nn_module_stack`` depth (None: draw every node)."""
DEFAULT_EXPAND: tuple[str, ...] = ("layers.0",)
"""Modules (FQN globs) kept expanded when folding: by default, the first transformer block."""
PALETTE = (
    "#8dd3c7", "#ffed6f", "#bebada", "#fb8072", "#80b1d3", "#fdb462",
    "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffffb3",
)  # fmt: skip
"""Handler fill colours (ColorBrewer Set3, light enough for black labels), in plan order."""


@dataclasses.dataclass
class Rendering:
    """Files written by :func:`render`."""

    html: Path
    before_svg: Path
    after_svg: Path


class _Legend:
    """Colour and CSS classes of each handler and rule of a report."""

    def __init__(self, report: Report) -> None:
        self.entries = [
            LegendEntry(
                name=handler,
                color=PALETTE[i % len(PALETTE)],
                css_class=f"h-{i}",
                rules=[
                    (rule, count, f"r-{i}-{j}")
                    for j, (rule, count) in enumerate(report.rule_matches.get(handler, {}).items())
                ],
            )
            for i, handler in enumerate(report.order)
        ]
        self._looks = {
            (e.name, rule): (e.color, (e.css_class, css))
            for e in self.entries
            for rule, _, css in e.rules
        }

    def styles(
        self, graph: fx.Graph, tag: str, origins: Mapping[str, tuple[str, str, dict[str, str]]]
    ) -> dict[fx.Node, NodeStyle]:
        """Every node's style; a node in ``origins`` (name → handler, rule, extra details)
        is filled with the handler's colour and classed ``tag``, handler and rule."""
        styles = {}
        for node in graph.nodes:
            handler, rule, extra = origins.get(node.name, ("", "", {}))
            look = self._looks.get((handler, rule))  # None: untouched, or an earlier run's node
            info = {**details(node), **extra}
            styles[node] = (
                NodeStyle(info) if look is None else NodeStyle(info, look[0], (tag, *look[1]))
            )
        return styles


def _matched(records: Sequence[MatchRecord]) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Nodes of the "before" graph that a rule matched (and the run replaced)."""
    return {
        name: (
            r.handler,
            r.rule,
            {
                "matched by": f"{r.handler} / rule {r.rule} (anchor {r.anchor})",
                "replaced by": ", ".join(r.created),
            },
        )
        for r in records
        for name in r.replaced
    }


def _created(graph: fx.Graph) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Nodes a handler created, from their ``meta["torchgraft"]`` provenance."""
    provenance = {node.name: node.meta.get(META_KEY) for node in graph.nodes}
    return {name: (p["handler"], p["rule"], {}) for name, p in provenance.items() if p}


def _panel_data(
    styles: Mapping[fx.Node, NodeStyle], groups: Mapping[fx.Node, Group | None]
) -> dict[str, dict]:
    folds: dict[str, dict] = {}
    for node, group in groups.items():
        if group is not None and group.kind == "fold":
            fold = folds.setdefault(group.id, {"module": group.module, "ops": 0, "members": []})
            fold["members"].append(node.name)
            fold["ops"] += is_op(node)
    return {"nodes": {n.name: dict(s.details) for n, s in styles.items()}, "folds": folds}


def render(
    before: fx.GraphModule,
    after: fx.GraphModule,
    report: Report,
    out_dir: str | Path,
    *,
    fold_depth: int | None = DEFAULT_FOLD_DEPTH,
    expand: Sequence[str] = DEFAULT_EXPAND,
    title: str = "torchgraft: before / after",
) -> Rendering:
    """Write ``before.svg``, ``after.svg`` and ``index.html`` for a run to ``out_dir``.

    ``after`` is ``before`` rewritten by the run that produced ``report`` (for example by
    :func:`torchgraft.tools.graph_copy.run_on_copy`); nodes of both are matched by name.
    ``fold_depth`` / ``expand``: see :mod:`torchgraft.tools.folding`.
    """
    out = Path(out_dir)
    legend = _Legend(report)
    sides = {
        "before": (before, legend.styles(before.graph, "matched", _matched(report.records))),
        "after": (after, legend.styles(after.graph, "created", _created(after.graph))),
    }
    panels, svgs = [], {}
    for side, (gm, styles) in sides.items():
        groups = group_nodes(gm.graph, fold_depth, expand)
        svg = svgs[side] = render_svg(to_dot(gm.graph, styles, groups))
        caption = f"{side}: {len(gm.graph.nodes)} nodes"
        panels.append(Panel(side, caption, svg, _panel_data(styles, groups)))
    hist_before, hist_after = op_histogram(before.graph), op_histogram(after.graph)
    rows = [
        (op, hist_before.get(op, 0), hist_after.get(op, 0))
        for op in sorted(hist_before | hist_after)
    ]
    matches = ", ".join(f"{name} {count}" for name, count in report.matches.items())
    page = build_page(
        title=title,
        summary=f"plan: {' → '.join(report.order)}; matches: {matches or 'none'}",
        legend=legend.entries,
        panels=panels,
        histogram=rows,
    )
    out.mkdir(parents=True, exist_ok=True)  # only once everything rendered: no empty directory
    paths = {side: out / f"{side}.svg" for side in svgs}
    for side, svg in svgs.items():
        paths[side].write_text(svg, encoding="utf-8")
    html_path = out / "index.html"
    html_path.write_text(page, encoding="utf-8")
    return Rendering(html_path, paths["before"], paths["after"])


def visualize_plan(
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    out_dir: str | Path,
    *,
    fold_depth: int | None = DEFAULT_FOLD_DEPTH,
    expand: Sequence[str] = DEFAULT_EXPAND,
) -> Rendering:
    """Run ``handlers`` on a copy of ``gm`` (``gm`` is not changed) and :func:`render` it."""
    after, report = run_on_copy(gm, handlers)
    return render(gm, after, report, out_dir, fold_depth=fold_depth, expand=expand)


def _fold_depth(text: str) -> int:
    depth = int(text)
    if depth < 0:
        raise argparse.ArgumentTypeError(f"fold depth must be 0 (no folding) or more, got {depth}")
    return depth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchgraft viz`` (the CLI adds the CONFIG argument)."""
    parser.add_argument("--out", required=True, type=Path, help="directory for the page and SVGs")
    parser.add_argument(
        "--fold-depth",
        type=_fold_depth,
        default=DEFAULT_FOLD_DEPTH,
        help="fold nodes by module at this nn_module_stack depth; 0 draws every node "
        f"(default {DEFAULT_FOLD_DEPTH})",
    )
    parser.add_argument(
        "--expand",
        action="append",
        metavar="GLOB",
        help=f"module FQN glob kept expanded when folding; repeatable (default {DEFAULT_EXPAND})",
    )
    add_stage_argument(parser)
    ir_dump.add_arguments(parser)


def main(
    args: argparse.Namespace,
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    inputs: Sequence[torch.Tensor] | None = None,
) -> int:
    """Run ``torchgraft viz`` on a captured graph and the config's handlers; exit status.

    With ``--stage joint`` or ``compile``, each graph of that stage (one step on ``inputs``,
    :func:`~torchgraft.tools.stage_graphs.stage_graphs`) gets its page in a subdirectory of
    ``--out`` (``joint/``, ``compile_forward/``, ``compile_backward/``), before and after the
    stage's handlers; ``--dump-ir`` then dumps those graphs the same way."""
    fold = dict(
        fold_depth=args.fold_depth or None,
        expand=DEFAULT_EXPAND if args.expand is None else args.expand,
    )
    if args.stage == "graph":
        rendering = visualize_plan(gm, handlers, args.out, **fold)
        print(f"wrote {rendering.html} ({rendering.before_svg.name}, {rendering.after_svg.name})")
        if args.dump_ir is not None:
            paths = ir_dump.dump_ir(gm, handlers, args.dump_ir)
            print(f"wrote {len(paths)} IR files to {args.dump_ir}")
        return 0
    for graph in stage_graphs(gm, handlers, args.stage, inputs):
        folder = graph.label.replace(" ", "_")
        after, report = run_on_copy(graph.module, handlers, args.stage)
        title = f"torchgraft: {graph.label} graph before / after"
        rendering = render(graph.module, after, report, args.out / folder, title=title, **fold)
        print(f"wrote {rendering.html} ({graph.label} graph)")
        if args.dump_ir is not None:
            paths = ir_dump.dump_ir(graph.module, handlers, args.dump_ir / folder, args.stage)
            print(f"wrote {len(paths)} IR files to {args.dump_ir / folder}")
    return 0
