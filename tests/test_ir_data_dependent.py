"""Replacements with data-dependent output sizes get unbacked sizes instead of failing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import torchgraft as tg

aten = torch.ops.aten


class CountPositive(nn.Module):
    def forward(self, x):
        return (x > 0).float().sum()


class SumOfNonzero(tg.Handler):
    """``sum(x)`` → ``sum(x[nonzero(x)])`` (the same for a 0/1 mask, via a dynamic size)."""

    @tg.rule
    def total(x):
        return x.sum()

    @total.replacement
    def _(x):
        return x[torch.nonzero(x)[:, 0]].sum()


class SumOfNonzeroAten(tg.Handler):
    @tg.rule
    def total(x):
        return aten.sum.default(x)

    @total.replacement
    def _(x):
        picked = aten.index.Tensor(x, [aten.select.int(aten.nonzero.default(x), 1, 0)])
        return aten.sum.default(picked)


@pytest.mark.parametrize(
    ("method", "handler"), [("symbolic_trace", SumOfNonzero), ("export", SumOfNonzeroAten)]
)
def test_nonzero_replacement_has_unbacked_sizes(method, handler):
    x = torch.randn(32)
    gm = tg.capture(CountPositive(), (x,), method=method)
    assert tg.PassManager([handler]).run(gm).matches == {handler.__name__: 1}
    sizes = [
        n.meta["val"].shape[0]
        for n in gm.graph.nodes
        if "val" in n.meta and isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].ndim == 1
    ]
    assert any(free_unbacked_symbols(s) for s in sizes)
    for _ in range(3):
        fresh = torch.randn(32)
        torch.testing.assert_close(gm(fresh), CountPositive()(fresh))
