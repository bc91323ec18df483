"""Handlers written for the engine tests (passed to PassManager as classes, not registered)."""

from __future__ import annotations

import torch

import torchgraft as tg
import torchgraft.ops.norm  # noqa: F401  (registers torchgraft::rms_norm)

aten = torch.ops.aten


def rms_pattern(x, w, eps: float):
    return aten.mul.Tensor(
        aten.mul.Tensor(
            x,
            aten.rsqrt.default(
                aten.add.Tensor(aten.mean.dim(aten.pow.Tensor_Scalar(x, 2), [-1], True), eps)
            ),
        ),
        w,
    )


class RMSNormIdentity(tg.Handler):
    """Replaces the six-op RMSNorm by the same six ops (bit-identical)."""

    rms = tg.rule(rms_pattern)

    @rms.replacement
    def _(x, w, eps):
        return rms_pattern(x, w, eps)


class FuseRMSNorm(tg.Handler):
    """Replaces the six-op RMSNorm by ``torchgraft::rms_norm``."""

    rms = tg.rule(rms_pattern)

    @rms.replacement
    def _(x, w, eps):
        return torch.ops.torchgraft.rms_norm.default(x, w, eps)


class LinearViaMatmul(tg.Handler):
    """Bias-free ``linear(x, w)`` → ``matmul(x, t(w))`` (same math, different ops)."""

    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        return aten.matmul.default(x, aten.t.default(w))


class SiluExpand(tg.Handler):
    """``silu(x)`` → ``x * sigmoid(x)``."""

    @tg.rule
    def silu(x):
        return aten.silu.default(x)

    @silu.replacement
    def _(x):
        return aten.mul.Tensor(x, aten.sigmoid.default(x))


class LowRankAdapters(tg.Handler):
    """``linear(x, w)`` of the attention's ``wq`` and the feed-forward's ``w2`` (a colwise
    and a rowwise layer under TP) → ``linear(x, w) + linear(linear(x, A), B)``, with new
    parameters ``A`` (seeded, so every process makes the same) and ``B`` (zero at first)."""

    rank = 4

    @tg.rule(include=["*.attention.wq", "*.feed_forward.w2"])
    def linear(x, w: torch.nn.Parameter):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(x, w):
        generator = torch.Generator().manual_seed(w.shape[0] * w.shape[1])
        a = tg.new_parameter(
            "lora_a", torch.randn(LowRankAdapters.rank, w.shape[1], generator=generator) * 0.1
        )
        b = tg.new_parameter("lora_b", torch.zeros(w.shape[0], LowRankAdapters.rank))
        low_rank = aten.linear.default(aten.linear.default(x, a), b)
        return aten.add.Tensor(aten.linear.default(x, w), low_rank)
