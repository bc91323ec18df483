"""Quantization primitives shared by the low-precision linear ops.

Only what more than one format needs lives here: the saturating float8 cast (float8 and
mxfp8 elements) and its values in float32 without the float8 bytes (the emulated GEMMs),
exact power-of-two exponents (float8 rowwise scales and MX block scales), symmetric absmax
int8 quantization (int8 and BitNet activations) and the exact float8 to float32 conversion
(:mod:`.kernels`). Everything computes in float32 unless stated otherwise.
"""

from __future__ import annotations

import torch

__all__ = [
    "float8_to_float32",
    "abs_max",
    "float8_values",
    "float8_values_",
    "floor_log2",
    "int8_absmax_quantize",
    "saturating_cast",
]


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp ``t`` to ``±finfo(dtype).max`` and cast it to the float8 ``dtype``.

    The cast rounds to nearest-even; the clamp makes overflow saturate instead of
    producing NaN/inf.
    """
    fmax = torch.finfo(dtype).max
    return t.clamp(-fmax, fmax).to(dtype)


_FLOAT8_VALUES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def float8_to_float32(t: torch.Tensor) -> torch.Tensor:
    """The float8 tensor ``t`` as float32: exactly ``t.float()``, faster on CPU.

    On CPU torch converts float8 element by element (measured: 362 us for 512x256 values on
    one core, more than half a 512x256x256 float32 GEMM); looking the 256 possible bytes up
    in a table made by that same conversion gives identical values in 58 us. Elsewhere the
    conversion is a native kernel and is used as it is, as it is for tensor subclasses
    (DTensor: the table would be a plain tensor among distributed ones).
    """
    if t.device.type != "cpu" or type(t) is not torch.Tensor:
        return t.float()
    key = (t.dtype, t.device)
    table = _FLOAT8_VALUES.get(key)
    if table is None:
        codes = torch.arange(256, dtype=torch.uint8, device=t.device)
        table = _FLOAT8_VALUES[key] = codes.view(t.dtype).float()
    return table.index_select(0, t.view(torch.uint8).reshape(-1).long()).view(t.shape)


# float8 format -> (mantissa bits, exponent of the smallest normal value).
_FLOAT8_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
_EXPONENT_MASK = 0x7F800000


def float8_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturating_cast(t, dtype)`` as float32 values, without making the float8 bytes:
    :func:`float8_values_` on a clamped copy of ``t``."""
    if not _rounds_in_float32(t):
        return float8_to_float32(saturating_cast(t, dtype))
    fmax = torch.finfo(dtype).max
    return float8_values_(t.clamp(-fmax, fmax), dtype, clamp=False)


def _rounds_in_float32(t: torch.Tensor) -> bool:
    """Whether :func:`float8_values_` rounds ``t`` by float32 arithmetic: a plain float32
    CPU tensor (elsewhere the float8 cast and conversion are native kernels)."""
    return t.device.type == "cpu" and type(t) is torch.Tensor and t.dtype == torch.float32


def float8_values_(t: torch.Tensor, dtype: torch.dtype, clamp: bool = True) -> torch.Tensor:
    """Replace the float32 ``t`` by ``saturating_cast(t, dtype)``'s values, in place; returns
    ``t``.

    Equal to ``float8_to_float32(saturating_cast(t, dtype))`` (a negative value that rounds
    to zero gives ``+0.0`` instead of ``-0.0``; NaN stays NaN). On CPU the float8 cast and
    the decode are the slowest passes and allocate two tensors; here, after the clamp, each
    value ``v`` is rounded to the float8 grid by float32 arithmetic: with ``q`` the spacing
    of float8 values at ``|v|`` (``2**(e - m)`` for ``|v|`` in ``[2**e, 2**(e+1))`` and
    ``m`` mantissa bits, at least the subnormal spacing ``2**(e_min - m)``) and
    ``c = 1.5 * 2**23 * q``, ``v + c`` lies in ``[2**23 q, 2**24 q)`` whose float32 spacing
    is ``q``, so the addition rounds ``v`` to a multiple of ``q``, to nearest, ties to even
    (``c / q`` is even), exactly as the float8 cast does, and ``(v + c) - c`` is exact.
    ``2**max(e, e_min)`` comes from ``v``'s exponent bits (an int32 view), ``c`` is that
    times ``1.5 * 2**(23 - m)`` (``add_``'s ``alpha``, exact).

    ``clamp=False`` skips the clamp where the caller knows ``|t| <= fmax * (1 + 2**-23)``
    (``t`` scaled by ``fmax / amax(|t|)``, as a float32 scale): such values round to at most
    ``fmax`` anyway. Other devices and tensor subclasses (DTensor) cast and convert.

    Raises:
        ValueError: if ``t`` is not float32.
    """
    if t.dtype != torch.float32:
        raise ValueError(f"float8_values_ rounds float32 tensors, got {t.dtype}")
    if not _rounds_in_float32(t):
        return t.copy_(float8_to_float32(saturating_cast(t, dtype)))
    fmax = torch.finfo(dtype).max
    mantissa_bits, min_exponent = _FLOAT8_FORMATS[dtype]
    if clamp:
        t.clamp_(-fmax, fmax)
    power = torch.bitwise_and(t.view(torch.int32), _EXPONENT_MASK)
    power = power.clamp_min_((min_exponent + 127) << 23).view(torch.float32)  # NaN: inf
    magic = 1.5 * 2.0 ** (23 - mantissa_bits)
    return t.add_(power, alpha=magic).sub_(power, alpha=magic)


def abs_max(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``t.abs().amax()`` (or along ``dim``, kept as size 1), without making ``|t|`` for
    plain tensors: ``max(max(t), -min(t))`` from one ``aminmax`` pass (NaN propagates)."""
    if type(t) is not torch.Tensor:
        return t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    low, high = torch.aminmax(t) if dim is None else torch.aminmax(t, dim=dim, keepdim=True)
    return torch.maximum(high, low.neg_())


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
