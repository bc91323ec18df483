"""The float8 weight-scale cache: reused while valid (also through the transpose that the
``[in, out]`` linear forms pass), bit-identical, invalidated on change; and the eager
backward's reuse of the forward's quantized operands: each tensor quantized once,
bit-identical to the grad ops that traced graphs call."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import torchgraft as tg
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
    return _count_scales(monkeypatch, lambda t: t.data_ptr() == w.data_ptr())


def _count_scales(monkeypatch: pytest.MonkeyPatch, which=lambda t: True) -> list[int]:
    """Count ``tensorwise_scale`` calls (on tensors ``which`` accepts) from now on."""
    calls = [0]
    original = f8.tensorwise_scale

    def counting(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        calls[0] += bool(which(t))
        return original(t, dtype)

    monkeypatch.setattr(f8, "tensorwise_scale", counting)
    return calls


def test_cached_scales_are_reused_and_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, g = _data(0)
    calls = _count_weight_amax(monkeypatch, w)
    uncached = _fwd_bwd(x, w, g)
    assert calls[0] == 1  # the forward computed amax(|W|), its backward reused Q(W)
    uncached_dx = f8.float8_linear_grad_input(g, w, "tensorwise")  # a traced backward's op
    assert calls[0] == 2

    precompute_float8_weight_scales([w])
    assert calls[0] == 3
    cached = _fwd_bwd(x, w, g)
    assert torch.equal(f8.float8_linear_grad_input(g, w, "tensorwise"), uncached_dx)
    assert calls[0] == 3, "forward/backward recomputed the weight scale despite the cache"
    for a, b in zip(uncached, cached, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_backward_reuses_the_forward_operands_exactly(
    monkeypatch: pytest.MonkeyPatch, recipe: str
) -> None:
    """The eager backward equals the grad ops bitwise; tensorwise quantizes X, W and dY once
    each (3 scales for the 3 GEMMs, not 6)."""
    x, w, g = _data(4)
    calls = _count_scales(monkeypatch)
    y = float8_linear(x, w, None, recipe)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    assert calls[0] == (3 if recipe == "tensorwise" else 0)
    assert torch.equal(dx, f8.float8_linear_grad_input(g, w, recipe))
    assert torch.equal(dw, f8.float8_linear_grad_weight(g, x, recipe))
    # one gradient only: the other operand is not needed, and the values do not change
    (dx_only,) = torch.autograd.grad(float8_linear(x, w.detach(), None, recipe), (x,), g)
    (dw_only,) = torch.autograd.grad(float8_linear(x.detach(), w, None, recipe), (w,), g)
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw)


def test_an_untaken_forward_is_not_reused() -> None:
    """Operands of a forward run without autograd are not handed to a later backward."""
    x, w, g = _data(5)
    other = torch.randn(3, 5, 64, requires_grad=True)
    with torch.no_grad():
        float8_linear(other, w, None, "tensorwise")
    y = float8_linear(x, w, None, "tensorwise")
    float8_linear(other.detach(), w.detach(), None, "tensorwise")  # after y, before backward
    (dw,) = torch.autograd.grad(y, (w,), g)
    assert torch.equal(dw, f8.float8_linear_grad_weight(g, x, "tensorwise"))


def test_transposed_weight_uses_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[in, out]`` weights reach the op as ``w.t()`` (GPT-2's ``Conv1D``): same scale."""
    x, w, g = _data(6)
    w_in_out = torch.nn.Parameter(w.detach().t().contiguous())
    calls = _count_weight_amax(monkeypatch, w_in_out)
    expected = _fwd_bwd(x, w_in_out.t(), g)
    precompute_float8_weight_scales([w_in_out])
    assert cached_float8_weight_scale(w_in_out.t()) is not None
    assert calls[0] == 2
    got = _fwd_bwd(x, w_in_out.t(), g)
    assert calls[0] == 2, "the transposed weight missed the cache"
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert cached_float8_weight_scale(w_in_out.t()[:8]) is None  # a slice is not the weight
    with torch.no_grad():
        w_in_out.mul_(2.0)
    assert cached_float8_weight_scale(w_in_out.t()) is None


class _Conv1DModel(torch.nn.Module):
    """GPT-2 style ``[in, out]`` weights: ``addmm(b, x2d, w)`` and ``x @ w``, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(64, 32) / 8)
        self.b1 = torch.nn.Parameter(torch.zeros(32))
        self.w2 = torch.nn.Parameter(torch.randn(32, 48) / 8)
        self.head = torch.nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1, x.view(-1, 64), self.w1).relu() @ self.w2
        return self.head(h)


def test_handler_hook_caches_in_out_weights() -> None:
    model = _Conv1DModel()
    x = torch.randn(2, 5, 64)
    gm = tg.capture(model, (x,))
    handler = tg.get_handler("float8")()
    assert tg.PassManager([handler]).run(gm).matches == {"float8": 2}
    weights = handler.weights(gm)
    assert {id(w) for w in weights} == {id(model.w1), id(model.w2)}
    handler.post_optimizer_hook([gm])
    assert cached_float8_weight_scale(model.w1.t()) is not None
    assert cached_float8_weight_scale(model.w2.t()) is not None


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
    assert calls[0] == 1  # recomputed (once: the backward reuses the forward's Q(W))
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


def test_linears_reading_one_input_quantize_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v projections of one activation: ``Q(x)`` computed once, bit-identical."""
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(3, 5, 64, generator=gen, requires_grad=True)
    x = h * 2.0  # an activation recorded by autograd
    ws = [torch.nn.Parameter(torch.randn(48, 64, generator=gen) / 8) for _ in range(3)]
    g = torch.randn(3, 5, 48, generator=gen)
    expected = [_fwd_bwd(x.detach().requires_grad_(), w, g) for w in ws]  # separate inputs
    calls = _count_weight_amax(monkeypatch, x)
    got = [_fwd_bwd(x, w, g) for w in ws]
    assert calls[0] == 1, "each linear quantized the shared input again"
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with torch.no_grad():
        x.mul_(3.0)  # in place: bumps x._version, the cached Q(x) is stale
    float8_linear(x, ws[0], None, "tensorwise")
    assert calls[0] == 2
    with torch.no_grad():
        y = x.detach()  # not recorded by autograd: quantized per call
        float8_linear(y, ws[0], None, "tensorwise")
        float8_linear(y, ws[1], None, "tensorwise")
    assert calls[0] == 4
