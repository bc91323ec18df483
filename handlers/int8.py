"""``int8``: int8 linears (``torchgraft::int8_linear``), as graph rules.

Every linear layer (any form of :mod:`~torchgraft.handlers.linear_rules`) but the head and
those in ``skip_fqns`` becomes ``torchgraft::int8_linear`` in one of
three modes (see :mod:`torchgraft.ops.int8`): weight-only, dynamic (per-token activations,
``torch._int_mm``) or mixed-precision training with each GEMM optionally int8. int8 has no
shape requirement (the GEMM pads operands as the kernels need).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

import torchgraft as tg
from torchgraft.handlers.kernel_option import KernelOption
from torchgraft.handlers.linear_rules import LinearHandler

__all__ = ["Int8"]

_INT8_LINEAR = torch.ops.torchgraft.int8_linear.default


@tg.register_handler("int8")
class Int8(LinearHandler):
    """Symmetric per-row int8 linears: weight-only, dynamic or mixed-precision training."""

    sqnr_tolerance = 26.0
    """Whole-model verify: the worst output/gradient SQNR measured on the tiny Llama was
    32.1 dB (training), 32.8 dB (dynamic), 34.2 dB (weight_only)."""

    op_sqnr_tolerance = 10.0
    """Per linear, replacement against ``F.linear`` on the same inputs (forward, and the
    gradients with the real cotangent): measured 37-38 dB, but 15.9 dB on a gradient with
    one token 100x the others (per-row scales along the tokens); a wrong scale reads 0 dB."""

    @dataclasses.dataclass(kw_only=True)
    class Options(LinearHandler.Options, KernelOption):
        mode: Literal["weight_only", "dynamic", "training"] = "training"
        """``"training"`` (default): int8 mixed-precision training, the GEMMs selected by the
        three flags below run in int8 on per-row quantized operands. ``"dynamic"``: weights
        and per-token activations int8 in the forward GEMM (``torch._int_mm``); backward in
        float32 on the quantized operands (straight-through). ``"weight_only"``: int8
        weights dequantized, float activations."""
        int8_forward: bool = True
        """``mode="training"`` only: the forward GEMM ``Y = X Wᵀ`` in int8."""
        int8_grad_input: bool = True
        """``mode="training"`` only: the input-gradient GEMM ``dX = dY W`` in int8."""
        int8_grad_weight: bool = True
        """``mode="training"`` only: the weight-gradient GEMM ``dW = dYᵀ X`` in int8."""

        def validate(self) -> None:
            flags = (self.int8_forward, self.int8_grad_input, self.int8_grad_weight)
            if self.mode != "training" and not all(flags):
                raise ValueError(
                    "int8_forward / int8_grad_input / int8_grad_weight select GEMMs only with "
                    f"mode='training'; set mode='training' or leave them True (mode={self.mode!r})"
                )

    def quantized_linear(self, x, w, b):
        o = self.options
        return _INT8_LINEAR(
            x, w, b, o.mode, o.int8_forward, o.int8_grad_input, o.int8_grad_weight, o.kernel
        )
