"""``mx``: OCP microscaling linears (``torchgraft::mx_linear``), as graph rules.

Every linear layer (any form of :mod:`~torchgraft.handlers.linear_rules`; not the head)
whose in_features ``K`` is a multiple of the MX block size 32 (and not in ``skip_fqns``)
becomes ``torchgraft::mx_linear(x, w, b, format)``: operands in blocks
of 32 along each GEMM's contraction dim with a shared E8M0 scale, emulated GEMM (see
:mod:`torchgraft.ops.mx`). Others stay as they are and are listed by ``skipped(gm)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

import torchgraft as tg
from torchgraft.handlers.linear_rules import LinearHandler
from torchgraft.ops.mx import BLOCK_SIZE

__all__ = ["MX"]

_MX_LINEAR = torch.ops.torchgraft.mx_linear.default

FORMAT_TOLERANCES = {"mxfp8": 14.0, "mxfp4": 3.0}
"""Verify-stage SQNR tolerance (dB) per element format."""

FORMAT_OP_TOLERANCES = {"mxfp8": 15.0, "mxfp4": 6.0}
"""Per-op SQNR tolerance (dB) per element format (``op_sqnr_tolerance``): per linear,
replacement against ``F.linear`` on the same inputs, forward and gradients, measured
24.3-27.0 dB (mxfp8) and 13.9-15.4 dB (mxfp4) on 6 transformers architectures."""


@tg.register_handler("mx")
class MX(LinearHandler):
    """MX (mxfp8 / mxfp4) linears for weights whose in_features is a multiple of 32."""

    sqnr_tolerance = 3.0
    """Whole-model verify, for the coarsest format (mxfp4): the worst output/gradient SQNR
    measured on the tiny Llama was 7.3 dB with mxfp4 and 19.3 dB with mxfp8; an instance
    with ``format="mxfp8"`` requires :data:`FORMAT_TOLERANCES` ``["mxfp8"]`` instead."""
    op_sqnr_tolerance = 6.0
    """Per op, for the coarsest format; an instance uses :data:`FORMAT_OP_TOLERANCES`."""

    @dataclasses.dataclass(kw_only=True)
    class Options(LinearHandler.Options):
        format: Literal["mxfp8", "mxfp4"] = "mxfp8"
        """Element format: ``"mxfp8"`` (float8 e4m3 elements) or ``"mxfp4"`` (fp4 e2m1
        elements, about 12 dB less accurate than mxfp8)."""

    def __init__(self, job_config: Any = None, parallel_dims: Any = None, **options: Any) -> None:
        super().__init__(job_config, parallel_dims, **options)
        # mxfp8 is ~12 dB more accurate than mxfp4: verify it against its own tolerance.
        self.sqnr_tolerance = FORMAT_TOLERANCES[self.options.format]
        self.op_sqnr_tolerance = FORMAT_OP_TOLERANCES[self.options.format]

    def shape_failure(self, w: torch.Tensor) -> str | None:
        k = w.shape[1]
        if k % BLOCK_SIZE:
            return (
                f"MX needs in_features K to be a multiple of the block size {BLOCK_SIZE}, "
                f"weight is [{w.shape[0]}, {k}] (K={k})"
            )
        return None

    def quantized_linear(self, x, w, b):
        return _MX_LINEAR(x, w, b, self.options.format)
