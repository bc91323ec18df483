"""``torchgraft::onednn_mm``: ``a @ b`` in float32 on oneDNN, for any strides."""

from __future__ import annotations

import pytest
import torch

from torchgraft.ops.numerics import sqnr

onednn_mm = torch.ops.torchgraft.onednn_mm.default


def test_onednn_mm_equals_mm_for_transposed_and_strided_operands():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 32, generator=g), torch.randn(64, 32, generator=g)
    for left, right in [(a, b.t()), (a.t().contiguous().t(), b.t().contiguous()), (b, a.t())]:
        expected = (left.double() @ right.double()).float()
        got = onednn_mm(left, right)
        assert got.shape == expected.shape and got.is_contiguous()
        assert sqnr(got, expected) > 120.0  # float32 rounding only
    torch.library.opcheck(onednn_mm, (a, b.t()), test_utils=("test_schema", "test_faketensor"))


def test_onednn_mm_adds_a_bias_per_column_as_addmm():
    g = torch.Generator().manual_seed(1)
    a, b, bias = (torch.randn(*s, generator=g) for s in ((48, 32), (32, 64), (64,)))
    expected = torch.addmm(bias.double(), a.double(), b.double()).float()
    assert sqnr(onednn_mm(a, b, bias), expected) > 120.0
    torch.library.opcheck(onednn_mm, (a, b, bias), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match=r"bias of \[N\] = \[64\]; got \(48, 64\)"):
        onednn_mm(a, b, torch.randn(48, 64))


def test_onednn_mm_refuses_what_it_does_not_compute():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"multiplies \[M, K\] by \[K, N\]"):
        onednn_mm(a, torch.randn(4, 8))
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        onednn_mm(a.double(), torch.randn(8, 2).double())
