"""All-or-nothing runs and error messages that name handler, rule, node and source line."""

from __future__ import annotations

import pytest
import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul

import torchgraft as tg

aten = torch.ops.aten


class FailsOnSecondLayer(tg.Handler):
    """Rewrites linears, but its replacement raises on the second layer's wq."""

    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        if w.shape[0] == 64 and x.shape[1] == 16 and FailsOnSecondLayer.calls == 1:
            raise ValueError("unsupported weight layout")
        FailsOnSecondLayer.calls += 1
        return aten.matmul.default(x, aten.t.default(w))

    calls = 0


class RaisesInFakeOp(tg.Handler):
    @tg.rule
    def silu(x):
        return aten.silu.default(x)

    @silu.replacement
    def _(x):
        return aten.mm.default(x, x)  # wrong rank for a 3-D input: fake propagation raises


def test_failed_run_leaves_graph_and_code_identical(llama_gm, tokens):
    code, nodes = llama_gm.code, [(n.name, n.target, n.args) for n in llama_gm.graph.nodes]
    ref = llama_gm(tokens)
    with pytest.raises(tg.RewriteError) as info:
        tg.PassManager([FuseRMSNorm, LinearViaMatmul, RaisesInFakeOp]).run(llama_gm)
    # The two earlier handlers' rewrites are undone too.
    assert llama_gm.code == code
    assert [(n.name, n.target, n.args) for n in llama_gm.graph.nodes] == nodes
    llama_gm.graph.lint()
    llama_gm.recompile()
    assert llama_gm.code == code
    assert torch.equal(llama_gm(tokens), ref)
    assert info.value.handler == "RaisesInFakeOp" and info.value.rule == "silu"


def test_rollback_after_partial_rule(llama_gm):
    FailsOnSecondLayer.calls = 0
    code = llama_gm.code
    count = len(llama_gm.graph.nodes)
    with pytest.raises(tg.RewriteError, match="unsupported weight layout"):
        # matches are traced per signature: force a re-trace per match by not caching
        tg.PassManager([FuseRMSNorm, FailsOnSecondLayer]).run(llama_gm)
    assert llama_gm.code == code and len(llama_gm.graph.nodes) == count


def test_error_names_handler_rule_node_and_source_line(llama_gm):
    with pytest.raises(tg.RewriteError) as info:
        tg.PassManager([RaisesInFakeOp]).run(llama_gm)
    message = str(info.value)
    assert "handler 'RaisesInFakeOp'" in message and "rule 'silu'" in message
    assert "node 'silu'" in message and "layers.0.feed_forward" in message
    assert "llama.py:" in message and "F.silu(self.w1(x))" in message
    assert info.value.source.endswith("return self.w2(F.silu(self.w1(x)) * self.w3(x))")


def test_missing_replacement_is_reported():
    class NoReplacement(tg.Handler):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

    gm = tg.capture(torch.nn.ReLU(), (torch.randn(3),))
    with pytest.raises(tg.RewriteError, match="has no replacement"):
        tg.PassManager([NoReplacement]).run(gm)


def test_where_predicate_error_is_wrapped(llama_gm):
    class BadWhere(tg.Handler):
        @tg.rule(where=lambda m: m["nope"])
        def silu(x):
            return aten.silu.default(x)

        @silu.replacement
        def _(x):
            return aten.silu.default(x)

    with pytest.raises(tg.RewriteError, match="rule 'silu'.*a filter raised KeyError"):
        tg.PassManager([BadWhere]).run(llama_gm)
