"""IR dumps: the graph's code after each handler, numbered in run order, with diffs."""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_rules import FuseRMSNorm, SiluExpand

import torchgraft as tg
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.models import build_llama
from torchgraft.tools.ir_dump import add_arguments, dump_ir


def test_dump_ir_writes_code_and_diff_per_handler(tmp_path):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(build_llama("tiny", seed=0), (tokens,))
    code = gm.code
    paths = dump_ir(gm, [FuseRMSNorm, SiluExpand], tmp_path / "ir")
    assert gm.code == code  # dumping does not rewrite the graph
    assert [p.name for p in paths] == [
        "00_captured.py",
        "01_FuseRMSNorm.py",
        "01_FuseRMSNorm.diff",
        "02_SiluExpand.py",
        "02_SiluExpand.diff",
    ]
    text = {p.name: p.read_text() for p in paths}
    assert "aten.rsqrt" in text["00_captured.py"] and "f32[2, 16, 64]" in text["00_captured.py"]
    assert "rms_norm" in text["01_FuseRMSNorm.py"] and "aten.rsqrt" not in text["01_FuseRMSNorm.py"]
    assert "aten.silu" in text["01_FuseRMSNorm.py"] and "aten.silu" not in text["02_SiluExpand.py"]

    diff = text["01_FuseRMSNorm.diff"].splitlines()
    assert diff[:2] == ["--- 00_captured.py", "+++ 01_FuseRMSNorm.py"]
    assert not any(line.startswith(("-class", "+class")) for line in diff)
    assert any(line.startswith("-") and "aten.rsqrt" in line for line in diff)
    assert any(line.startswith("+") and "torchgraft.rms_norm" in line for line in diff)
    diff = text["02_SiluExpand.diff"].splitlines()
    assert diff[:2] == ["--- 01_FuseRMSNorm.py", "+++ 02_SiluExpand.py"]
    assert any(line.startswith("+") and "aten.sigmoid" in line for line in diff)
    assert not any(line.startswith(("-", "+")) and "rms_norm" in line for line in diff[2:])


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_copy_has_the_same_code_and_shares_parameters(method):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    gm = tg.capture(model, (x,), method=method)
    copy = copy_graph_module(gm)
    assert copy.graph is not gm.graph
    assert copy.print_readable(print_output=False) == gm.print_readable(print_output=False)
    assert all(a is b for a, b in zip(copy.parameters(), model.parameters(), strict=True))
    assert torch.equal(copy(x), model(x))


def test_dump_ir_option():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).dump_ir is None
    assert str(parser.parse_args(["--dump-ir", "out/ir"]).dump_ir) == "out/ir"
