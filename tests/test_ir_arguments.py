"""Torch-level and method calls unify by parameter name, like aten calls by schema."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.subgraph_rewriter import replace_pattern

import torchgraft as tg
from torchgraft.ir.arguments import argument_name, call_args


class Clamps(nn.Module):
    def forward(self, x):
        return torch.clamp(x, max=0.0) + torch.clamp(x, 1.0, 0.0) + torch.clamp(x, 0.0, 1.0)


class ClampMinToRelu(tg.Handler):
    @tg.rule
    def clamp_min(x):
        return torch.clamp(x, min=0.0)

    @clamp_min.replacement
    def _(x):
        return torch.relu(x)


class ClampUnitToSigmoid(tg.Handler):
    @tg.rule
    def clamp_unit(x):
        return torch.clamp(x, min=0.0, max=1.0)

    @clamp_unit.replacement
    def _(x):
        return torch.sigmoid(x)


def _trace(model, x):
    return tg.capture(model, (x,), method="symbolic_trace")


def test_clamp_min_pattern_never_matches_clamp_max():
    x = torch.randn(64)

    class OnlyMax(nn.Module):
        def forward(self, x):
            return torch.clamp(x, max=0.0)

    gm, ref = _trace(OnlyMax(), x), OnlyMax()(x)
    report = tg.PassManager([ClampMinToRelu], allow=["no_match"]).run(gm)
    assert report.matches == {"ClampMinToRelu": 0}
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    # replace_pattern agrees: no match.
    theirs = fx.symbolic_trace(OnlyMax())
    assert replace_pattern(theirs, lambda x: torch.clamp(x, min=0.0), lambda x: torch.relu(x)) == []


def test_keyword_and_positional_clamps_unify_by_name():
    x = torch.randn(64)
    gm = _trace(Clamps(), x)
    report = tg.PassManager([ClampUnitToSigmoid]).run(gm)
    # clamp(x, 0, 1) is clamp(min=0, max=1); clamp(x, 1, 0) and clamp(max=0) are not.
    assert report.matches == {"ClampUnitToSigmoid": 1}
    expected = torch.clamp(x, max=0.0) + torch.clamp(x, 1.0, 0.0) + torch.sigmoid(x)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    left = [call_args(n)[1:] for n in gm.graph.nodes if n.target is torch.clamp]
    assert left == [(None, 0.0), (1.0, 0.0)]


def test_method_calls_bind_by_name_and_fill_defaults():
    class Methods(nn.Module):
        def forward(self, x):
            return x.clamp(max=1.0, min=0.0) + x.clamp(0.0, 1.0) + x.sum(-1, keepdim=True)

    gm = _trace(Methods(), torch.randn(3, 4))
    args = [call_args(n) for n in gm.graph.nodes if n.op == "call_method"]
    x = next(iter(gm.graph.nodes))
    assert args[0] == args[1] == (x, 0.0, 1.0)
    assert args[2] == (x, -1, True, None)  # sum.dim_IntList, its dtype default filled in
    clamp = next(n for n in gm.graph.nodes if n.op == "call_method")
    assert argument_name(clamp, 2) == "argument 2 ('max')"


def test_overloads_are_told_apart_by_tensor_arguments():
    class Maxes(nn.Module):
        def forward(self, x, y):
            return torch.max(x, 1).values[:, None] + torch.max(x, y)

    gm = tg.capture(Maxes(), (torch.randn(3, 4), torch.randn(4)), method="symbolic_trace")
    calls = [n for n in gm.graph.nodes if n.target is torch.max]
    assert [argument_name(n, 1) for n in calls] == ["argument 1 ('dim')", "argument 1 ('other')"]
    assert call_args(calls[0])[2] is False  # keepdim's default


def test_python_functions_bind_by_their_signature():
    class Acts(nn.Module):
        def forward(self, x):
            return nn.functional.leaky_relu(x, negative_slope=0.2) + nn.functional.leaky_relu(
                x, 0.2
            )

    gm = _trace(Acts(), torch.randn(8))

    class LeakyToRelu(tg.Handler):
        @tg.rule
        def leaky(x):
            return nn.functional.leaky_relu(x, 0.2, False)

        @leaky.replacement
        def _(x):
            return torch.relu(x)

    assert tg.PassManager([LeakyToRelu]).run(gm).matches == {"LeakyToRelu": 2}
