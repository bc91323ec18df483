"""Leaf calls in replacements stay one call_function node and never run while rewriting."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.fx.subgraph_rewriter import replace_pattern

import torchgraft as tg

aten = torch.ops.aten
CALLS: list[str] = []


def doubled_relu(x):
    CALLS.append("doubled_relu")
    return torch.relu(x) * 2


fx.wrap("doubled_relu")


@tg.leaf(fake=lambda x, w: x.new_empty((*x.shape[:-1], w.shape[0])))
def opaque_linear(x, w):
    CALLS.append("opaque_linear")
    return x @ w.t()


class ToWrapped(tg.Handler):
    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(x):
        return doubled_relu(x)


class ToLeaf(tg.Handler):
    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        return aten.mul.Tensor(opaque_linear(x, w), 1.0)  # computes on the leaf's fake value


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def test_fx_wrapped_function_stays_one_call_like_replace_pattern():
    model, x = _mlp(), torch.randn(3, 8)
    gm = tg.capture(model, (x,))
    CALLS.clear()
    assert tg.PassManager([ToWrapped]).run(gm).matches == {"ToWrapped": 1}
    assert CALLS == []  # not executed while rewriting
    calls = [n for n in gm.graph.nodes if n.target is doubled_relu]
    assert len(calls) == 1 and not any(n.target is torch.relu for n in gm.graph.nodes)
    expected = model[2](torch.relu(model[0](x)) * 2)
    torch.testing.assert_close(gm(x), expected)
    assert CALLS == ["doubled_relu"]

    theirs = tg.capture(model, (x,), method="symbolic_trace")
    replace_pattern(theirs, lambda x: nn.functional.relu(x), lambda x: doubled_relu(x))
    assert [n.target for n in theirs.graph.nodes].count(doubled_relu) == 1
    torch.testing.assert_close(theirs(x), expected)


def test_declared_leaf_gets_meta_from_its_fake_function():
    model, x = _mlp(), torch.randn(3, 8)
    gm = tg.capture(model, (x,))
    CALLS.clear()
    assert tg.PassManager([ToLeaf]).run(gm).matches == {"ToLeaf": 2}
    assert CALLS == []
    leaves = [n for n in gm.graph.nodes if n.target is opaque_linear.__wrapped__]
    assert [tuple(n.meta["val"].shape) for n in leaves] == [(3, 16), (3, 4)]
    torch.testing.assert_close(gm(x), model(x))
    assert CALLS == ["opaque_linear", "opaque_linear"]


def test_leaf_call_is_matched_by_patterns_calling_it():
    gm = tg.capture(_mlp(), (torch.randn(3, 8),))
    tg.PassManager([ToLeaf]).run(gm)

    class LeafBack(tg.Handler):
        @tg.rule
        def leaf(x, w):
            return opaque_linear(x, w)

        @leaf.replacement
        def _(x, w):
            return aten.linear.default(x, w)

    # LeafBack undoes what ToLeaf made (a clobber the test intends)
    assert tg.PassManager([LeafBack], allow=["clobber"]).run(gm).matches == {"LeafBack": 2}


def test_computing_on_a_leaf_without_fake_function_is_explained():
    class Bad(tg.Handler):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

        @relu.replacement
        def _(x):
            return aten.neg.default(doubled_relu(x))

    gm = tg.capture(_mlp(), (torch.randn(3, 8),))
    with pytest.raises(tg.RewriteError, match=r"leaf call 'doubled_relu'.*tg.leaf\(fn, fake="):
        tg.PassManager([Bad]).run(gm)
