"""Before/after rendering of the tiny Llama: the SVGs and the page, parsed and checked."""

from __future__ import annotations

import argparse
import json
import re
import types
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul, SiluExpand

import torchgraft as tg
from torchgraft.ir.provenance import META_KEY, module_fqn
from torchgraft.models import build_llama
from torchgraft.tools import visualize
from torchgraft.tools.folding import group_nodes
from torchgraft.tools.graph_copy import run_on_copy
from torchgraft.tools.graph_dot import (
    FOLD_FILL,
    GraphvizNotFoundError,
    NodeStyle,
    render_svg,
    to_dot,
)

SVG = "{http://www.w3.org/2000/svg}"
XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"
HANDLERS = [FuseRMSNorm, SiluExpand, LinearViaMatmul]


@pytest.fixture(scope="module")
def plan():
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(build_llama("tiny", seed=0), (tokens,))
    code = gm.code
    after, report = run_on_copy(gm, HANDLERS)
    assert gm.code == code  # the captured graph is not touched
    return types.SimpleNamespace(gm=gm, after=after, report=report)


@pytest.fixture(scope="module")
def flat(plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("flat")
    return visualize.render(plan.gm, plan.after, plan.report, out, fold_depth=None)


@pytest.fixture(scope="module")
def folded(plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("folded")
    return visualize.render(plan.gm, plan.after, plan.report, out)  # depth 2, layers.0 expanded


def svg_nodes(svg: ET.Element) -> dict[str, ET.Element]:
    """Graphviz node groups by id (``<g id=... class="node ...">``)."""
    return {
        g.get("id"): g for g in svg.iter(f"{SVG}g") if g.get("class", "").split()[:1] == ["node"]
    }


def classes(g: ET.Element) -> set[str]:
    return set(g.get("class").split())


def fills(g: ET.Element) -> set[str]:
    shapes = [e for tag in ("polygon", "ellipse", "path") for e in g.iter(f"{SVG}{tag}")]
    return {e.get("fill") for e in shapes} - {"none"}


def handler_colors(report) -> dict[str, str]:
    return {name: visualize.PALETTE[i] for i, name in enumerate(report.order)}


class PageParser(HTMLParser):
    """Start tags with their attributes, and the text of each table row."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self.rows[-1].append("")

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "td":
            self.rows[-1][-1] += data


def parse_page(path) -> tuple[PageParser, dict]:
    text = path.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    data = re.search(r'<script type="application/json" id="tg-data">(.*?)</script>', text, re.S)
    return parser, json.loads(data[1])["graphs"]


def test_every_node_appears_with_its_fx_name_as_id(plan, flat):
    for gm, path in ((plan.gm, flat.before_svg), (plan.after, flat.after_svg)):
        assert set(svg_nodes(ET.parse(path).getroot())) == {n.name for n in gm.graph.nodes}


def test_after_colours_match_provenance(plan, flat):
    colors = handler_colors(plan.report)
    nodes = svg_nodes(ET.parse(flat.after_svg).getroot())
    created = 0
    for node in plan.after.graph.nodes:
        provenance = node.meta.get(META_KEY)
        expected = colors[provenance["handler"]] if provenance else "white"
        assert fills(nodes[node.name]) == {expected}, node.name
        assert ("created" in classes(nodes[node.name])) == bool(provenance)
        created += bool(provenance)
    assert created == 5 + 2 * 2 + 15 * 2  # rms_norm; sigmoid + mul; t + matmul


def test_highlighted_nodes_are_the_matches(plan, flat):
    nodes = svg_nodes(ET.parse(flat.before_svg).getroot())
    matched = {n for n, g in nodes.items() if "matched" in classes(g)}
    assert matched == {name for r in plan.report.records for name in r.replaced}
    colors = handler_colors(plan.report)
    for record in plan.report.records:
        for name in record.replaced:
            assert fills(nodes[name]) == {colors[record.handler]}
    # Each rule's nodes carry the rule's class: the legend focuses on exactly them.
    for i, handler in enumerate(plan.report.order):
        for j, rule in enumerate(plan.report.rule_matches[handler]):
            with_class = {n for n, g in nodes.items() if f"r-{i}-{j}" in classes(g)}
            replaced = {
                name
                for r in plan.report.records
                if (r.handler, r.rule) == (handler, rule)
                for name in r.replaced
            }
            assert with_class == replaced


def test_tooltip_shows_op_shape_dtype_module_and_source(flat):
    linear = svg_nodes(ET.parse(flat.before_svg).getroot())["linear"]
    tooltip = next(a.get(XLINK_TITLE) for a in linear.iter(f"{SVG}a"))
    lines = dict(line.split(": ", 1) for line in tooltip.splitlines())
    assert lines["op"] == "aten.linear.default"
    assert lines["shape"] == "[2, 16, 64]" and lines["dtype"] == "float32"
    assert lines["module"] == "layers.0.attention.wq"
    assert "llama.py:" in lines["source"] and "self.wq(x)" in lines["source"]
    assert lines["matched by"].startswith("LinearViaMatmul / rule linear")
    assert lines["replaced by"] == "t_default, matmul_default"


def test_page_has_both_graphs_legend_details_and_histogram(plan, flat):
    parser, data = parse_page(flat.html)
    legend = [a for tag, a in parser.tags if tag == "li" and "data-handler" in a]
    assert [a["data-handler"] for a in legend] == plan.report.order
    swatches = [a["style"] for tag, a in parser.tags if a.get("class") == "swatch"]
    assert swatches == [f"background:{c}" for c in handler_colors(plan.report).values()]
    for side, gm in (("before", plan.gm), ("after", plan.after)):
        drawn = {a["data-node"] for tag, a in parser.tags if a.get("id", "").startswith(side)
                 and "data-node" in a}  # fmt: skip
        assert drawn == {n.name for n in gm.graph.nodes} == set(data[side]["nodes"])
    assert data["after"]["nodes"]["rms_norm_default"]["created by"] == "FuseRMSNorm / rule rms"
    histogram = {row[0]: (int(row[1]), int(row[2])) for row in parser.rows if row}
    assert histogram["aten.linear.default"] == (15, 0)
    assert histogram["aten.matmul.default"] == (0, 15)
    assert histogram["torchgraft.rms_norm.default"] == (0, 5)
    assert histogram["aten.embedding.default"] == (1, 1)


def test_folded_page_lists_every_node_in_a_fold_or_drawn(plan, folded):
    parser, data = parse_page(folded.html)
    for side, gm in (("before", plan.gm), ("after", plan.after)):
        svg = ET.parse(folded.before_svg if side == "before" else folded.after_svg).getroot()
        drawn = svg_nodes(svg)
        folds = data[side]["folds"]
        assert set(drawn) == {n for n in data[side]["nodes"] if n in drawn} | set(folds)
        members = [m for fold in folds.values() for m in fold["members"]]
        assert len(members) == len(set(members))
        assert set(members).isdisjoint(drawn)
        assert set(members) | (set(drawn) - set(folds)) == {n.name for n in gm.graph.nodes}
        # The expanded block is drawn node by node, the other block is folded by module.
        in_block = {p: [n.name for n in gm.graph.nodes if module_fqn(n).startswith(p)] for p in
                    ("layers.0.attention.", "layers.1.attention.")}  # fmt: skip
        assert set(in_block["layers.0.attention."]) <= set(drawn)
        assert set(in_block["layers.1.attention."]).isdisjoint(drawn)
        assert "fold:layers.1.attention" in folds
        for fold_id, fold in folds.items():
            label = "".join(t.text for t in drawn[fold_id].iter(f"{SVG}text"))
            assert fold["module"] in label and f"{fold['ops']} ops" in label


def test_fold_stripes_are_the_colours_of_their_members(plan, folded):
    colors = handler_colors(plan.report)
    _, data = parse_page(folded.html)
    nodes = {n.name: n for n in plan.after.graph.nodes}
    drawn = svg_nodes(ET.parse(folded.after_svg).getroot())
    for fold_id, fold in data["after"]["folds"].items():
        provenance = [nodes[m].meta.get(META_KEY) for m in fold["members"]]
        expected = {colors[p["handler"]] if p else FOLD_FILL for p in provenance}
        assert fills(drawn[fold_id]) == expected, fold_id


def test_group_nodes_by_depth_and_expand(plan):
    graph = plan.gm.graph
    by_name = {n.name: n for n in graph.nodes}
    depth1 = group_nodes(graph, 1)
    assert depth1[by_name["linear"]].id == "fold:layers.0"
    assert depth1[by_name["layers_0_attention_wq_weight"]].id == "fold:layers.0"  # follows users
    assert depth1[by_name["rope_cos"]] is None  # used by both blocks
    assert depth1[by_name["tokens"]] is None  # inputs are always drawn
    expanded = group_nodes(graph, 2, ["layers.1"])
    assert expanded[by_name["linear_7"]].id == "cluster:layers.1"
    assert expanded[by_name["linear"]].id == "fold:layers.0.attention"
    assert set(group_nodes(graph, None).values()) == {None}
    with pytest.raises(ValueError, match="fold depth"):
        group_nodes(graph, 0)


def test_a_fold_of_one_node_is_drawn_as_the_node():
    small = tg.capture(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.ones(2, 4),)
    )
    groups = {n.name: g for n, g in group_nodes(small.graph, 1).items()}
    assert groups["linear"].id == groups["_0_weight"].id == "fold:0"
    assert groups["relu"] is None


def test_dot_quotes_labels_and_tooltips(plan):
    graph = plan.gm.graph
    awkward = 'path "C:\\temp\\x" \\n <tag> & more\nsecond line'
    styles = {n: NodeStyle({"note": awkward}) for n in graph.nodes}
    svg = ET.fromstring(render_svg(to_dot(graph, styles, group_nodes(graph, None))))
    embedding = svg_nodes(svg)["embedding"]
    assert next(a.get(XLINK_TITLE) for a in embedding.iter(f"{SVG}a")) == f"note: {awkward}"


def test_missing_dot_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without Graphviz
    with pytest.raises(GraphvizNotFoundError, match=r"Debian.*'graphviz'"):
        render_svg("digraph G { a }")


def test_cli_entry_writes_page_and_ir(plan, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    visualize.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path / "viz"), "--fold-depth", "1", "--dump-ir", str(tmp_path / "ir")]
    )
    assert visualize.main(args, plan.gm, [SiluExpand]) == 0
    assert (tmp_path / "viz" / "index.html").is_file()
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == [
        "00_captured.py", "01_SiluExpand.diff", "01_SiluExpand.py",
    ]  # fmt: skip
    assert "wrote" in capsys.readouterr().out
