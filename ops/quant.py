"""Quantization primitives shared by the low-precision linear ops.

Only what more than one format needs lives here: the saturating float8 cast (float8 and
mxfp8 elements), exact power-of-two exponents (float8 rowwise scales and MX block scales),
symmetric absmax int8 quantization (int8 and BitNet activations) and the int8 GEMM (int8
and BitNet; native or emulated, :mod:`.kernels`). Everything computes in float32 unless stated otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import emulated_mm, resolve

__all__ = ["floor_log2", "int8_absmax_quantize", "int8_matmul", "saturating_cast"]

# ``torch._int_mm`` constraints of the CUDA kernel (aten/src/ATen/native/cuda/Blas.cpp):
# rows of the first operand > 16, contraction and output columns multiples of 8.
# The CPU kernel accepts any shape (checked with torch 2.13 down to 1x1x1).
_INT_MM_MIN_ROWS = 17
_INT_MM_MULTIPLE = 8


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp ``t`` to ``±finfo(dtype).max`` and cast it to the float8 ``dtype``.

    The cast rounds to nearest-even; the clamp makes overflow saturate instead of
    producing NaN/inf.
    """
    fmax = torch.finfo(dtype).max
    return t.clamp(-fmax, fmax).to(dtype)


def floor_log2(t: torch.Tensor) -> torch.Tensor:
    """``floor(log2(t))`` for positive finite ``t``, exactly, as an int32 tensor.

    Uses the binary exponent from ``torch.frexp`` (``t = m * 2**e`` with ``m`` in
    ``[0.5, 1)``), so values just below a power of two are never rounded up as
    ``torch.log2`` may do. Zeros map to ``-1``; callers clamp the exponent range.
    """
    _, exponent = torch.frexp(t)
    return exponent - 1


def int8_absmax_quantize(
    t: torch.Tensor, dim: int, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantization of ``t`` along ``dim``.

    ``s = max(amax(|t|, dim), eps) / 127`` and ``q = clamp(round(t / s), -128, 127)``, so
    ``q * s`` dequantizes. ``eps`` only matters for all-zero slices (which then quantize to
    zeros instead of NaN).

    Returns:
        ``(q, s)``: ``q`` int8 with the shape of ``t``, ``s`` float32 with ``dim`` kept
        as size 1.
    """
    t = t.float()
    scale = t.abs().amax(dim=dim, keepdim=True).clamp(min=eps) / 127.0
    q = (t / scale).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """int8 x int8 matrix product ``a @ b`` as float32, for ``a [M, K]``, ``b [K, N]``.

    ``kernel`` (:func:`torchgraft.ops.kernels.resolve`) picks the GEMM. Native:
    ``torch._int_mm`` with exact int32 accumulation; the operands are zero-padded to the
    CUDA kernel's constraints (``M > 16``, ``K`` and ``N`` multiples of 8) and the result
    sliced back (zero rows/columns add nothing to the integer dot products, so this is exact;
    the CPU kernel needs no padding, but one code path serves every device). Emulated: the
    same integers multiplied by the float32 GEMM, exact while partial sums stay below
    ``2**24`` (``K <= 1040`` for any int8 values), float32 rounding beyond.
    """
    if resolve(kernel, "int8", a.device, (torch.int8, torch.int8)) == "emulated":
        return emulated_mm(a, b, torch.float32)
    m, k = a.shape
    n = b.shape[1]
    pad_m = max(_INT_MM_MIN_ROWS - m, 0)
    pad_k = -k % _INT_MM_MULTIPLE
    pad_n = -n % _INT_MM_MULTIPLE
    if pad_m or pad_k or pad_n:
        a = F.pad(a, (0, pad_k, 0, pad_m))
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n].float()
