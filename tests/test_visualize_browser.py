"""The visualization page in a real headless Chromium: it renders, its script runs."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul, SiluExpand

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.tools.visualize import visualize_plan

CHROMIUM = shutil.which("chromium")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


class DomParser(HTMLParser):
    """Each start tag with its attributes and the id of the closest enclosing graph panel;
    the text inside each element that has an id."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        panel = next(
            (a["id"] for _, a in reversed(self.stack) if "tg-graph" in a.get("class", "")), None
        )
        self.elements.append((tag, attrs, panel))
        if tag not in ("meta", "br", "img", "input", "link"):
            self.stack.append((tag, attrs))

    def handle_data(self, data):
        for _, attrs in self.stack:
            if "id" in attrs:
                self.text[attrs["id"]] = self.text.get(attrs["id"], "") + data

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass


def open_page(url: str, profile, *extra: str) -> DomParser:
    """The DOM of ``url`` after its scripts ran, from a headless Chromium."""
    result = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", *extra, url],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    dom = DomParser()
    dom.feed(result.stdout)
    return dom


def selected(dom: DomParser) -> list[tuple[str, str]]:
    return [(p, a["data-node"]) for _, a, p in dom.elements if "selected" in a.get("class", "")]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(build_llama("tiny", seed=0), (tokens,))
    handlers = [FuseRMSNorm, SiluExpand, LinearViaMatmul]
    url = visualize_plan(gm, handlers, tmp_path / "viz").html.resolve().as_uri()

    # Open the page with a matched node selected (as a click would), and screenshot it.
    screenshot = tmp_path / "page.png"
    shot = (f"--screenshot={screenshot}", "--window-size=1600,1000")
    dom = open_page(f"{url}#before/linear", tmp_path / "profile", *shot)
    body = next(attrs for tag, attrs, _ in dom.elements if tag == "body")
    assert body.get("data-ready") == "true"  # the page's script ran to its end
    for side in ("before", "after"):
        svgs = [attrs for tag, attrs, panel in dom.elements if tag == "svg" and panel == side]
        assert len(svgs) == 1 and svgs[0]["style"].startswith("width:")  # fitted by the script
        nodes = [a for tag, a, panel in dom.elements if panel == side and "data-node" in a]
        assert len(nodes) > 40
    legend = [a["data-handler"] for tag, a, _ in dom.elements if "data-handler" in a]
    assert legend == ["FuseRMSNorm", "SiluExpand", "LinearViaMatmul"]
    # The node, and in the other graph what replaced it, are outlined; details are shown.
    assert selected(dom) == [
        ("before", "linear"), ("after", "t_default"), ("after", "matmul_default"),
    ]  # fmt: skip
    assert "aten.linear.default" in dom.text["tg-details"]
    assert "layers.0.attention.wq" in dom.text["tg-details"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000

    # A folded module is selected with its counterpart fold in the other graph.
    fold = "fold:layers.1.attention"
    dom = open_page(f"{url}#after/{fold}", tmp_path / "profile")
    assert selected(dom) == [("before", fold), ("after", fold)]
    assert "scaled_dot_product_attention_1" in dom.text["tg-details"]
