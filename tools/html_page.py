"""One self-contained HTML page: two inline SVG graphs, a legend, a details panel, a table.

No network access: CSS, JavaScript, the SVGs and the node data are all in the page. The
node data is a JSON ``<script id="tg-data">`` block, ``{"graphs": {side: {"nodes": {name:
details}, "folds": {fold id: details and members}}}}``; inline SVG elements carry their
fx node name in ``data-node`` and their ids are prefixed with the side, so ids stay unique.
``index.html#before/linear_3`` opens the page with that node (or ``fold:<module>``) selected.
"""

from __future__ import annotations

import dataclasses
import html
import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)


@dataclasses.dataclass
class LegendEntry:
    """One handler in the legend: its colour, CSS class and per-rule match counts."""

    name: str
    color: str
    css_class: str
    rules: list[tuple[str, int, str]]
    """``(rule name, matches, CSS class of the nodes it matched)``."""


@dataclasses.dataclass
class Panel:
    """One side of the page: a graph's SVG and the data the details panel shows."""

    side: str
    caption: str
    svg: str
    data: Mapping[str, Any]


def inline_svg(svg: str, side: str) -> str:
    """Graphviz SVG made embeddable: ids prefixed with ``side``, nodes tagged ``data-node``."""
    root = ET.fromstring(svg)
    for element in root.iter():
        ident = element.get("id")
        if ident is None:
            continue
        if element.get("class", "").split()[:1] == ["node"]:
            element.set("data-node", ident)
        element.set("id", f"{side}-{ident}")
    return ET.tostring(root, encoding="unicode")


def _legend(entries: Sequence[LegendEntry]) -> str:
    items = []
    for entry in entries:
        total = sum(count for _, count, _ in entry.rules)
        rules = "".join(
            f'<li data-focus="{css}"><span class="rule">{html.escape(rule)}</span> '
            f'<span class="count">{count}</span></li>'
            for rule, count, css in entry.rules
        )
        items.append(
            f'<li class="handler" data-handler="{html.escape(entry.name)}">'
            f'<span class="swatch" style="background:{entry.color}"></span>'
            f'<span class="name" data-focus="{entry.css_class}">{html.escape(entry.name)}</span> '
            f'<span class="count">{total} matches</span><ul class="rules">{rules}</ul></li>'
        )
    return f'<ul id="tg-legend">{"".join(items)}</ul>'


def _histogram(rows: Sequence[tuple[str, int, int]]) -> str:
    body = "".join(
        f'<tr class="{"changed" if b != a else ""}"><td>{html.escape(op)}</td>'
        f"<td>{b}</td><td>{a}</td><td>{a - b:+d}</td></tr>"
        for op, b, a in rows
    )
    return (
        '<table id="tg-histogram"><thead><tr><th>op</th><th>before</th><th>after</th>'
        f"<th>change</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _panel(panel: Panel) -> str:
    return (
        f'<section class="tg-panel"><header><h2>{html.escape(panel.caption)}</h2>'
        f'<span class="tg-zoom" data-side="{panel.side}"><button data-zoom="0.8">&minus;</button>'
        '<button data-zoom="1.25">+</button><button data-zoom="fit">fit</button></span></header>'
        f'<div class="tg-graph" id="{panel.side}" data-side="{panel.side}">'
        f"{inline_svg(panel.svg, panel.side)}</div></section>"
    )


def build_page(
    *,
    title: str,
    summary: str,
    legend: Sequence[LegendEntry],
    panels: Sequence[Panel],
    histogram: Sequence[tuple[str, int, int]],
) -> str:
    """The whole page as one string."""
    # "<" escaped: no "</script>" or "<!--" in the data can end or confuse the script block.
    data = json.dumps({"graphs": {p.side: p.data for p in panels}}).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1><p id="tg-summary">{html.escape(summary)}</p>
{_legend(legend)}
<p class="hint">Hover a node for its op, shapes, dtype, module and source line; click it for
details (its counterpart, or what replaced it, is outlined in the other graph; link to a node
with <code>#before/NAME</code>). Click a handler or rule in the legend to dim everything it did not
touch.</p>
<main id="tg-graphs">{"".join(_panel(p) for p in panels)}</main>
<aside id="tg-details"><em>Click a node.</em></aside>
<h2>Op histogram</h2>{_histogram(histogram)}
<script type="application/json" id="tg-data">{data}</script>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: .2em 0; }
#tg-legend, #tg-legend ul { list-style: none; padding: 0; margin: 0; }
#tg-legend > li { display: inline-block; vertical-align: top; margin: 0 1.5em .5em 0; }
#tg-legend .rules { font-size: .9em; margin-left: 1.6em; }
#tg-legend [data-focus] { cursor: pointer; }
#tg-legend [data-focus]:hover { text-decoration: underline; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #555;
  vertical-align: middle; margin-right: .4em; }
.count { color: #666; } .hint { color: #666; font-size: .9em; }
#tg-graphs { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.tg-panel { min-width: 0; }
.tg-panel header { display: flex; justify-content: space-between; align-items: center; }
.tg-graph { height: 75vh; overflow: auto; border: 1px solid #ccc; background: #fff; }
.tg-graph svg { display: block; }
.tg-graph g.node { cursor: pointer; }
.tg-graph g.node.selected polygon, .tg-graph g.node.selected ellipse,
.tg-graph g.node.selected path { stroke: #d62728; stroke-width: 4px; }
.tg-graph g.node.dim { opacity: .2; }
#tg-details { position: fixed; right: 1em; bottom: 1em; max-width: 40em; max-height: 40vh;
  overflow: auto; background: #fffff4; border: 1px solid #aaa; padding: .5em .8em;
  box-shadow: 0 2px 8px rgba(0,0,0,.2); font-size: .9em; }
#tg-details th { text-align: left; padding-right: 1em; vertical-align: top; }
#tg-details td { font-family: ui-monospace, monospace; white-space: pre-wrap;
  word-break: break-all; }
#tg-histogram { border-collapse: collapse; margin-bottom: 20vh; }
#tg-histogram td, #tg-histogram th { border: 1px solid #ccc; padding: .15em .6em; }
#tg-histogram td:not(:first-child) { text-align: right; }
#tg-histogram tr.changed { background: #fff3c4; font-weight: 600; }
"""

_JS = """
(() => {
  const data = JSON.parse(document.getElementById('tg-data').textContent).graphs;
  const foldOf = {};
  for (const [side, graph] of Object.entries(data)) {
    foldOf[side] = {};
    for (const [id, fold] of Object.entries(graph.folds))
      for (const name of fold.members) foldOf[side][name] = id;
  }
  const details = document.getElementById('tg-details');
  const cell = (text) => {
    const td = document.createElement('td');
    td.textContent = text;
    return td;
  };

  function select(side, key) {
    const graph = data[side];
    const info = graph.nodes[key] || graph.folds[key];
    const table = document.createElement('table');
    const heading = document.createElement('tr');
    heading.append(cell(side), cell(key));
    table.append(heading);
    for (const [k, v] of Object.entries(info)) {
      const row = document.createElement('tr');
      const th = document.createElement('th'); th.textContent = k;
      row.append(th, cell(Array.isArray(v) ? v.join(', ') : String(v)));
      table.append(row);
    }
    details.replaceChildren(table);
    document.querySelectorAll('g.node.selected').forEach((g) => g.classList.remove('selected'));
    // Also outline what replaced the node, or what it replaced, in the other graph.
    const related = [info['replaced by'], info.replaced].filter(Boolean).flatMap((s) => s.split(', '));
    const names = [...(graph.folds[key] ? graph.folds[key].members : [key]), ...related];
    for (const other of Object.keys(data)) {
      const ids = new Set(names.map((n) => foldOf[other][n] || n));  // folded: its fold
      document.querySelectorAll(`#${other} g.node`).forEach((g) => {
        if (ids.has(g.dataset.node)) g.classList.add('selected');
      });
    }
  }

  // A link to "index.html#before/linear_3" opens the page with that node selected.
  const hash = decodeURIComponent(location.hash.slice(1));
  const cut = hash.indexOf('/');
  const [side, key] = [hash.slice(0, cut), hash.slice(cut + 1)];
  if (data[side] && (data[side].nodes[key] || data[side].folds[key])) select(side, key);

  document.querySelectorAll('.tg-graph').forEach((div) => div.addEventListener('click', (ev) => {
    const g = ev.target.closest('g.node');
    if (g) { ev.preventDefault(); select(div.dataset.side, g.dataset.node); }
  }));

  let focused = null;
  const focusable = document.querySelectorAll('#tg-legend [data-focus]');
  focusable.forEach((el) => el.addEventListener('click', () => {
    focused = focused === el.dataset.focus ? null : el.dataset.focus;
    document.querySelectorAll('.tg-graph g.node').forEach((g) =>
      g.classList.toggle('dim', focused !== null && !g.classList.contains(focused)));
  }));

  const scale = {};
  function zoom(side, factor) {
    const div = document.getElementById(side);
    const svg = div.querySelector('svg');
    const natural = svg.viewBox.baseVal.width * 4 / 3;
    scale[side] = factor === 'fit'
      ? Math.min(1, div.clientWidth / natural) : scale[side] * Number(factor);
    svg.style.width = `${natural * scale[side]}px`;
    svg.style.height = 'auto';
  }
  document.querySelectorAll('.tg-zoom button').forEach((button) => button.addEventListener('click',
    () => zoom(button.parentElement.dataset.side, button.dataset.zoom)));
  Object.keys(data).forEach((side) => zoom(side, 'fit'));
  document.body.dataset.ready = 'true';
})();
"""
