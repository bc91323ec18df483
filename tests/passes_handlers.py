"""Registered handlers for the pass-manager, config and CLI tests (configs import this
module through ``imports: [passes_handlers]``). Names start with ``t_`` so they cannot
collide with built-in handlers."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul, SiluExpand

import torchgraft as tg

aten = torch.ops.aten


@tg.register_handler("t_fuse_rms")
class TFuseRMS(FuseRMSNorm):
    """Six-op RMSNorm → ``torchgraft::rms_norm`` (exact)."""


@tg.register_handler("t_silu")
class TSilu(SiluExpand):
    """``silu(x)`` → ``x * sigmoid(x)`` (exact)."""


@tg.register_handler("t_linear_matmul")
class TLinearMatmul(LinearViaMatmul):
    """``linear(x, w)`` → ``matmul(x, t(w))`` (exact)."""


@tg.register_handler("t_matmul_back")
class TMatmulBack(tg.Handler):
    """``matmul(x, t(w))`` → ``linear(x, w)``: undoes ``t_linear_matmul``."""

    @tg.rule
    def matmul(x, w):
        return aten.matmul.default(x, aten.t.default(w))

    @matmul.replacement
    def _(x, w):
        return aten.linear.default(x, w)


@tg.register_handler("t_matmul_back_after")
class TMatmulBackAfter(TMatmulBack):
    """``t_matmul_back`` declared to run after ``t_linear_matmul``."""

    after = ("t_linear_matmul",)


@tg.register_handler("t_low_precision")
class TLowPrecision(tg.Handler):
    """Bias-free linears computed in a low-precision dtype: lossy, yet declared exact."""

    @dataclasses.dataclass(kw_only=True)
    class Options:
        dtype: Literal["bfloat16", "float16"] = "bfloat16"
        """Dtype the GEMM runs in."""
        skip_output: bool = False
        """Keep the output projection in float32."""

    def reject(self, match: tg.Match) -> str | None:
        if self.options.skip_output and match.module_fqn == "output":
            return "skip_output is set"
        return None

    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @linear.replacement
    def _(self, x, w):
        dtype = getattr(torch, self.options.dtype)
        y = aten.linear.default(
            aten._to_copy.default(x, dtype=dtype), aten._to_copy.default(w, dtype=dtype)
        )
        return aten._to_copy.default(y, dtype=torch.float32)


@tg.register_handler("t_low_precision_tolerant")
class TLowPrecisionTolerant(TLowPrecision):
    """``t_low_precision`` with an honest tolerance."""

    sqnr_tolerance = 20.0


@tg.register_handler("t_relu")
class TRelu(tg.Handler):
    """``relu`` → ``gelu``: the Llama has no relu, so it matches nothing."""

    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(x):
        return aten.gelu.default(x)


@tg.register_handler("t_needs_rms")
class TNeedsRMS(TSilu):
    """``t_silu`` that requires ``t_fuse_rms`` in the plan, before it."""

    requires = ("t_fuse_rms",)
