"""The rewriter never corrupts what it does not own: graph metadata, shapes, node names."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul
from test_rollback_and_errors import RaisesInFakeOp

import torchgraft as tg

aten = torch.ops.aten


class TransposeInPlace(tg.Handler):
    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(x):
        return aten.transpose_.default(x, 0, 1)


def test_in_place_replacement_does_not_change_graph_metadata():
    gm = tg.capture(torch.nn.ReLU(), (torch.randn(2, 3),))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = x.meta["val"]
    with pytest.raises(tg.RewriteError, match=r"is \[3, 2\] float32 but it replaces"):
        tg.PassManager([TransposeInPlace]).run(gm)
    assert x.meta["val"] is val and val.shape == (2, 3) and val.stride() == (3, 1)


def test_in_place_replacement_on_square_input_keeps_input_strides():
    gm = tg.capture(torch.nn.ReLU(), (torch.randn(3, 3),))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    tg.PassManager([TransposeInPlace]).run(gm)
    assert x.meta["val"].stride() == (3, 1)
    (out,) = [n for n in gm.graph.nodes if n.target is aten.transpose_.default]
    assert out.meta["val"].stride() == (1, 3)
    inp = torch.randn(3, 3)
    torch.testing.assert_close(gm(inp.clone()), inp.t())


class LinearToRowSum(tg.Handler):
    """Wrong on purpose: a [N, 1] replacement for a [N, D] linear."""

    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        return aten.sum.dim_IntList(aten.matmul.default(x, aten.t.default(w)), [-1], True)


class LinearInHalf(tg.Handler):
    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        return aten.linear.default(x.to(torch.bfloat16), w.to(torch.bfloat16))


def test_replacement_with_wrong_shape_is_refused_and_rolled_back(llama_gm, tokens):
    code, ref = llama_gm.code, llama_gm(tokens)
    with pytest.raises(tg.RewriteError) as info:
        tg.PassManager([FuseRMSNorm, LinearToRowSum]).run(llama_gm)
    message = str(info.value)
    assert "rule 'linear'" in message and "handler 'LinearToRowSum'" in message
    assert "is [2, 16, 1] float32 but it replaces node 'linear'" in message
    assert "which is [2, 16, 64] float32" in message and "layers.0.attention.wq" in message
    assert info.value.rule == "linear" and info.value.node == "linear"
    assert info.value.source is not None and "llama.py" in info.value.source
    assert llama_gm.code == code
    torch.testing.assert_close(llama_gm(tokens), ref, rtol=0, atol=0)


def test_replacement_with_wrong_dtype_is_refused(llama_gm):
    with pytest.raises(
        tg.RewriteError, match=r"is \[2, 16, 64\] bfloat16 .* \[2, 16, 64\] float32"
    ):
        tg.PassManager([LinearInHalf]).run(llama_gm)


def test_rollback_frees_node_names(llama, tokens):
    fresh, reused = tg.capture(llama, (tokens,)), tg.capture(llama, (tokens,))
    with pytest.raises(tg.RewriteError):
        tg.PassManager([FuseRMSNorm, LinearViaMatmul, RaisesInFakeOp]).run(reused)
    tg.PassManager([FuseRMSNorm, LinearViaMatmul]).run(reused)
    tg.PassManager([FuseRMSNorm, LinearViaMatmul]).run(fresh)
    assert [n.name for n in reused.graph.nodes] == [n.name for n in fresh.graph.nodes]
    assert reused.code == fresh.code


def test_fake_tensor_traceback_not_logged(llama_gm):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    logger.addHandler(handler)
    try:
        with pytest.raises(tg.RewriteError, match="a must be 2D"):
            tg.PassManager([RaisesInFakeOp]).run(llama_gm)
    finally:
        logger.removeHandler(handler)
    assert records == []
