"""The float8 weight-scale cache: reused while valid, bit-identical, invalidated on change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from torchgraft.ops import float8 as f8
from torchgraft.ops.float8 import (
    cached_float8_weight_scale,
    clear_float8_weight_scales,
    float8_linear,
    precompute_float8_weight_scales,
)


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_float8_weight_scales()
    yield
    clear_float8_weight_scales()


def _data(seed: int) -> tuple[torch.Tensor, torch.nn.Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 64, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(48, 64, generator=gen) / 8)
    return x, w, torch.randn(3, 5, 48, generator=gen)


def _fwd_bwd(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    y = float8_linear(x, w, None, "tensorwise")
    return [y, *torch.autograd.grad(y, (x, w), g)]


def _count_weight_amax(monkeypatch: pytest.MonkeyPatch, w: torch.Tensor) -> list[int]:
    """Count ``tensorwise_scale`` calls on ``w``'s storage from now on."""
    calls = [0]
    original = f8.tensorwise_scale

    def counting(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        calls[0] += t.data_ptr() == w.data_ptr()
        return original(t, dtype)

    monkeypatch.setattr(f8, "tensorwise_scale", counting)
    return calls


def test_cached_scales_are_reused_and_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, g = _data(0)
    calls = _count_weight_amax(monkeypatch, w)
    uncached = _fwd_bwd(x, w, g)
    assert calls[0] == 2  # forward and grad-input each computed amax(|W|)

    precompute_float8_weight_scales([w])
    assert calls[0] == 3
    cached = _fwd_bwd(x, w, g)
    assert calls[0] == 3, "forward/backward recomputed the weight scale despite the cache"
    for a, b in zip(uncached, cached, strict=True):
        assert torch.equal(a, b)


def test_in_place_update_invalidates(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, g = _data(1)
    precompute_float8_weight_scales([w])
    stale = cached_float8_weight_scale(w)
    assert stale is not None
    with torch.no_grad():
        w.mul_(3.0)  # what an optimizer step does: in place, bumps w._version
    assert cached_float8_weight_scale(w) is None
    calls = _count_weight_amax(monkeypatch, w)
    after = _fwd_bwd(x, w, g)
    assert calls[0] == 2  # recomputed
    clear_float8_weight_scales()
    assert all(torch.equal(a, b) for a, b in zip(after, _fwd_bwd(x, w, g), strict=True))
    precompute_float8_weight_scales([w])
    assert not torch.equal(cached_float8_weight_scale(w), stale)


def test_optimizer_step_and_data_swap_invalidate() -> None:
    x, w, g = _data(2)
    opt = torch.optim.SGD([w], lr=0.1)
    precompute_float8_weight_scales([w])
    w.grad = _fwd_bwd(x, w, g)[2]
    opt.step()
    assert cached_float8_weight_scale(w) is None
    precompute_float8_weight_scales([w])  # the post-optimizer hook
    assert cached_float8_weight_scale(w) is not None
    w.data = torch.randn(48, 64)
    assert cached_float8_weight_scale(w) is None


def test_cache_is_per_object_and_weak() -> None:
    _, w, _ = _data(3)
    precompute_float8_weight_scales([w])
    assert cached_float8_weight_scale(w.detach()) is None  # another object, same storage
    assert cached_float8_weight_scale(w.clone()) is None
    del w
    assert len(f8._WEIGHT_SCALES) == 0


def test_inference_tensors_are_rejected() -> None:
    with torch.inference_mode():
        w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="inference tensor"):
        precompute_float8_weight_scales([w])
