"""``torchgraft.ops.numerics.sqnr``."""

from __future__ import annotations

import math

import pytest
import torch

from torchgraft.ops.numerics import sqnr


def test_known_value_and_scale_invariance() -> None:
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sqnr(ref * 1.1, ref) == pytest.approx(20.0)  # noise is 0.1 * ref
    assert sqnr(ref * 1.001 * 1e-3, ref * 1e-3) == pytest.approx(60.0, abs=0.01)


def test_exact_match_is_inf_and_zero_reference_is_minus_inf() -> None:
    ref = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert sqnr(ref.clone(), ref) == math.inf
    assert sqnr(ref, torch.zeros(3, 4)) == -math.inf


def test_computed_in_float64() -> None:
    ref = torch.full((4,), 1.0, dtype=torch.float64)
    x = ref + 1e-12  # below float32 resolution: a float32 computation would say inf
    assert sqnr(x, ref) == pytest.approx(240.0, abs=0.01)
    assert sqnr(ref.to(torch.bfloat16) * 2, ref.float()) == pytest.approx(0.0)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        sqnr(torch.ones(3), torch.ones(1, 3))
