"""``torchgraft::mx_linear``: OCP microscaling (MX) linear, emulated (mxfp8 and mxfp4).

Each GEMM operand is split into blocks of 32 consecutive elements along that GEMM's
contraction dimension. A block shares one E8M0 scale ``2**e`` with
``e = clamp(floor(log2(amax_block)) - emax, -127, 127)``; its elements ``t / 2**e`` are cast
with saturation to the element format:

* ``"mxfp8"``: float8 e4m3 (``emax = 8``, max 448), round-to-nearest-even;
* ``"mxfp4"``: fp4 e2m1 (``emax = 2``), emulated on its grid ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``
  with round-to-nearest-even and saturation at 6.

The GEMM is emulated in float32 on the dequantized operands. The forward ``Y = X Wᵀ``
blocks along ``K``; the backward uses the same element format with blocks along its own
contraction dims: ``dX = Q(dY) Q(W)`` along ``N``, ``dW = Q(dY)ᵀ Q(X)`` along the tokens
``M``. ``K % 32 == 0`` is required (as for real MX weight layouts); ``N`` and ``M`` may be
ragged: the last block is zero-padded, which changes neither its amax nor the dot products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .linear import (
    as_2d,
    check_linear_args,
    fake_grad_input,
    fake_grad_weight,
    fake_linear,
    finish_grad_input,
    finish_linear,
    register_linear_autograd,
)
from .quant import float8_values, floor_log2

__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "mx_fake_quantize",
    "mx_linear",
    "mx_linear_grad_input",
    "mx_linear_grad_weight",
    "round_to_fp4_e2m1",
]

BLOCK_SIZE = 32
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127
_FP4_MAX = 6.0


def round_to_fp4_e2m1(t: torch.Tensor) -> torch.Tensor:
    """Round float32 ``t`` to the fp4 e2m1 grid, nearest-even, saturating at ±6.

    The grid spacing is 0.5 below 2, 1 in ``[2, 4)`` and 2 from 4; rounding ``|t| / step``
    to the nearest even integer (``torch.round``) is round-to-nearest-even on the grid
    because an even multiple of the step is exactly a grid point with a zero mantissa bit.
    """
    mag = t.abs()
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return torch.sign(t) * (torch.round(mag / step) * step).clamp(max=_FP4_MAX)


def _cast_mxfp8(t: torch.Tensor) -> torch.Tensor:
    return float8_values(t, torch.float8_e4m3fn)


# fmt -> (emax of the element format, saturating round-trip cast of scaled elements)
FORMATS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "mxfp8": (8, _cast_mxfp8),
    "mxfp4": (2, round_to_fp4_e2m1),
}


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"MX format must be one of {tuple(FORMATS)}, got {fmt!r}")


def _check_k(k: int) -> None:
    if k % BLOCK_SIZE != 0:
        raise ValueError(
            f"mx_linear needs in_features K divisible by {BLOCK_SIZE} (MX block size), got K={k}"
        )


def mx_fake_quantize(t: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    """``t`` quantized to MX ``fmt`` in blocks of 32 along ``dim`` and dequantized (float32)."""
    emax, cast = FORMATS[fmt]
    t = t.float().movedim(dim, -1)
    n = t.shape[-1]
    blocks = F.pad(t, (0, -n % BLOCK_SIZE)).unflatten(-1, (-1, BLOCK_SIZE))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = (floor_log2(amax) - emax).clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP)
    scale = torch.exp2(exponent.to(torch.float32))
    dequantized = cast(blocks / scale) * scale
    return dequantized.flatten(-2)[..., :n].movedim(-1, dim)


def _mx_mm(a: torch.Tensor, b: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 ``Q(a) @ Q(b)`` for ``a [M, K]``, ``b [K, N]``, blocks along ``K``."""
    return mx_fake_quantize(a, fmt, dim=1) @ mx_fake_quantize(b, fmt, dim=0)


@torch.library.custom_op("torchgraft::mx_linear", mutates_args=())
def mx_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with MX-quantized operands; ``fmt`` is ``"mxfp8"`` or
    ``"mxfp4"``; needs ``K % 32 == 0`` (see the module docstring)."""
    check_linear_args(x, w, bias)
    _check_fmt(fmt)
    _check_k(x.shape[-1])
    return finish_linear(_mx_mm(as_2d(x), w.t(), fmt), x, bias)


@torch.library.custom_op("torchgraft::mx_linear_grad_input", mutates_args=())
def mx_linear_grad_input(grad: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``dX = Q(dY) Q(W)``, blocks along ``N``."""
    _check_fmt(fmt)
    return finish_grad_input(_mx_mm(as_2d(grad), w, fmt), grad)


@torch.library.custom_op("torchgraft::mx_linear_grad_weight", mutates_args=())
def mx_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``dW = Q(dY)ᵀ Q(X)``, blocks along the tokens ``M``."""
    _check_fmt(fmt)
    return _mx_mm(as_2d(grad).t(), as_2d(x), fmt).to(grad.dtype)


@mx_linear.register_fake
def _mx_linear_fake(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    _check_fmt(fmt)
    _check_k(x.shape[-1])
    return fake_linear(x, w, bias)


mx_linear_grad_input.register_fake(fake_grad_input)
mx_linear_grad_weight.register_fake(fake_grad_weight)
register_linear_autograd(mx_linear, mx_linear_grad_input, mx_linear_grad_weight)
