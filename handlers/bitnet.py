"""``bitnet``: BitNet b1.58 linears (``torchgraft::bitnet_linear``), as graph rules.

Every linear layer (any form of :mod:`~torchgraft.handlers.linear_rules`) but the head and
those in ``skip_fqns`` becomes ``torchgraft::bitnet_linear(x, w, b, kernel)``:
ternary weights with absmean scale, per-token 8-bit activations, straight-through
estimator in backward (see :mod:`torchgraft.ops.bitnet`). No shape requirement.
"""

from __future__ import annotations

import dataclasses

import torch

import torchgraft as tg
from torchgraft.handlers.kernel_option import KernelOption
from torchgraft.handlers.linear_rules import LinearHandler

__all__ = ["BitNet"]

_BITNET_LINEAR = torch.ops.torchgraft.bitnet_linear.default


@tg.register_handler("bitnet")
class BitNet(LinearHandler):
    """BitNet b1.58 (ternary weights, int8 activations) for every linear."""

    sqnr_tolerance = -3.0
    """BitNet trains a different (ternary) model rather than approximating the float one:
    the worst whole-model output/gradient SQNR against float32 measured on the tiny Llama
    was only 0.4-1.0 dB. The verify stage can therefore only catch gross breakage (NaN,
    zeros, a lost scale); the formula itself is tested per op against float64."""

    op_sqnr_tolerance = 2.0
    """Per linear, replacement against ``F.linear`` on the same inputs (forward, and the
    straight-through gradients with the real cotangent): measured 4.9-5.6 dB on 6
    transformers architectures (ternary weights are a coarse approximation)."""

    @dataclasses.dataclass(kw_only=True)
    class Options(LinearHandler.Options, KernelOption):
        """The shared linear options plus the int8 GEMM's ``kernel``."""

    def quantized_linear(self, x, w, b):
        return _BITNET_LINEAR(x, w, b, self.options.kernel)
