"""Quantization primitives: fp4 e2m1 rounding, float8 values without float8 bytes, exact
exponents, padded int8 GEMM, MX blocks."""

from __future__ import annotations

import pytest
import torch

from torchgraft.ops.kernels import int8_matmul
from torchgraft.ops.mx import mx_fake_quantize, round_to_fp4_e2m1
from torchgraft.ops.quant import (
    abs_max,
    float8_to_float32,
    float8_values,
    float8_values_,
    floor_log2,
    int8_absmax_quantize,
    saturating_cast,
)


def test_fp4_rounding_ties_to_even_and_saturates() -> None:
    # exact ties go to the code with a zero mantissa bit: 0, 1, 2, 4 (and 8 -> saturates to 6)
    values = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 6.5, 100.0, 0.2, 0.3, 2.9, 4.9, 5.1]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, 0.5, 3.0, 4.0, 6.0]
    t = torch.tensor(values)
    assert round_to_fp4_e2m1(t).tolist() == want
    assert round_to_fp4_e2m1(-t).tolist() == [-v for v in want]


def test_fp4_rounding_matches_grid_search() -> None:
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    t = torch.randn(10_000, generator=torch.Generator().manual_seed(3)) * 3
    nearest = grid[(t.abs().clamp(max=6).unsqueeze(-1) - grid).abs().argmin(-1)] * t.sign()
    assert torch.equal(round_to_fp4_e2m1(t), nearest)  # random values hit no exact tie


def test_floor_log2_is_exact_next_to_powers_of_two() -> None:
    powers = torch.tensor([2.0**k for k in range(-126, 127, 7)], dtype=torch.float64)
    below = torch.nextafter(powers, torch.zeros_like(powers))
    assert torch.equal(floor_log2(powers), torch.arange(-126, 127, 7, dtype=torch.int32))
    assert torch.equal(floor_log2(below), torch.arange(-127, 126, 7, dtype=torch.int32))


@pytest.mark.parametrize("kernel", ["native", "emulated"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 3, 5), (7, 36, 20), (17, 8, 8), (40, 64, 48)])
def test_int8_matmul_is_exact_for_any_shape(m: int, k: int, n: int, kernel: str) -> None:
    gen = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).t()  # column-major
    got = int8_matmul(a, b, kernel)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, (a.long() @ b.long()).float())


def test_int8_absmax_quantize_rows_and_zero_rows() -> None:
    t = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = int8_absmax_quantize(t, dim=1)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 rounds to even 64
    assert torch.allclose(s, torch.tensor([[2.0 / 127], [1e-12 / 127]]))


def test_saturating_cast_clamps_instead_of_overflowing() -> None:
    t = torch.tensor([1e6, -1e6, 500.0])
    assert saturating_cast(t, torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0]
    assert saturating_cast(t, torch.float8_e5m2).float().tolist() == [57344.0, -57344.0, 512.0]


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_blocks_share_a_power_of_two_scale(fmt: str) -> None:
    # one block with amax 5 -> e = floor(log2 5) - emax; elements are fmt values times 2**e
    t = torch.randn(1, 32, generator=torch.Generator().manual_seed(11))
    t[0, 3] = 5.0
    q = mx_fake_quantize(t, fmt, dim=1)
    emax = 8 if fmt == "mxfp8" else 2
    elems = q / 2.0 ** (2 - emax)
    if fmt == "mxfp4":
        assert torch.equal(round_to_fp4_e2m1(elems), elems)
    else:
        assert torch.equal(elems.to(torch.float8_e4m3fn).float(), elems)


def test_mx_ragged_last_block_equals_zero_padding() -> None:
    t = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([t, torch.zeros(24, 3)])
    for fmt in ("mxfp8", "mxfp4"):
        assert torch.equal(mx_fake_quantize(t, fmt, 0), mx_fake_quantize(padded, fmt, 0)[:40])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_to_float32_equals_torch_conversion_for_every_byte(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    every = torch.stack([codes, codes.flip(0)]).view(dtype).t()  # non-contiguous, 2-D
    torch.testing.assert_close(
        float8_to_float32(every), every.float(), rtol=0, atol=0, equal_nan=True
    )
    assert float8_to_float32(every).shape == every.shape


def _torch_float8_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return t.clamp(-fmax, fmax).to(dtype).float()  # torch's own cast and conversion


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_values_round_like_the_float8_cast(dtype) -> None:
    """Every float8 value, every exact tie between neighbours (ties to even), their float32
    neighbours, both signs, random values over the whole float32 range, and the specials."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = codes[codes.isfinite()].unique()  # sorted, -fmax..fmax
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32
    fmax = grid[-1].item()
    edges = torch.tensor([1e-45, 1e-40, 2.0**-126, fmax * (1 + 2**-23)])
    points = torch.cat([grid, ties, grid * 1.5, edges])
    up = torch.nextafter(points, torch.full_like(points, torch.inf))
    down = torch.nextafter(points, torch.full_like(points, -torch.inf))
    gen = torch.Generator().manual_seed(7)
    spread = (
        torch.randn(20_000, generator=gen)
        * 2.0 ** torch.randint(-150, 128, (20_000,), generator=gen).float()
    )
    specials = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, torch.nan, 3.4e38, -3.4e38])
    t = torch.cat([points, up, down, -points, -up, -down, spread, specials])
    got = float8_values(t, dtype)
    want = _torch_float8_values(t, dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # without the clamp, for values a scale from the tensor's own amax can produce
    in_range = t[~(t.abs() > fmax * (1 + 2**-23))]  # NaN included
    assert (in_range.abs() == fmax * (1 + 2**-23)).any()
    unclamped = float8_values_(in_range.clone(), dtype, clamp=False)
    want = _torch_float8_values(in_range, dtype)
    torch.testing.assert_close(unclamped, want, rtol=0, atol=0, equal_nan=True)


def test_float8_values_keep_the_input_and_its_layout() -> None:
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(8)).mul(300).t()
    before = t.clone()
    got = float8_values(t, torch.float8_e4m3fn)
    assert torch.equal(t, before) and got.shape == t.shape
    assert torch.equal(got, _torch_float8_values(t, torch.float8_e4m3fn))
    assert float8_values_(t, torch.float8_e4m3fn) is t and torch.equal(t, got)  # in place
    bf16 = before.bfloat16()
    assert torch.equal(
        float8_values(bf16, torch.float8_e5m2), _torch_float8_values(bf16, torch.float8_e5m2)
    )
    with pytest.raises(ValueError, match="float32"):
        float8_values_(bf16, torch.float8_e4m3fn)


def test_abs_max_equals_abs_then_amax() -> None:
    t = torch.randn(33, 65, generator=torch.Generator().manual_seed(9)) * 5
    assert torch.equal(abs_max(t), t.abs().amax())
    for dim in (0, 1):
        assert torch.equal(abs_max(t, dim), t.abs().amax(dim, keepdim=True))
    t[3, 4] = torch.nan
    assert abs_max(t).isnan() and abs_max(t, 1)[3].isnan() and not abs_max(t, 1)[2].isnan()
