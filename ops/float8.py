"""``torchgraft::float8_linear``: float8 training linear (tensorwise and rowwise recipes).

Each of the three GEMMs (``Y = X Wᵀ``, ``dX = dY W``, ``dW = dYᵀ X``) quantizes both operands
to float8 and runs ``torch._scaled_mm`` with float32 output:

* ``"tensorwise"``: one scale per tensor, ``scale = fmax / max(amax(|t|), 1e-12)``
  computed in float64 and stored as float32; ``t8 = clamp(t * scale, ±fmax).to(dtype)``.
  ``x`` and ``w`` use e4m3 (fmax 448), ``grad_output`` e5m2 (fmax 57344).
* ``"rowwise"``: one scale per row of each GEMM operand, amax taken along that GEMM's
  contraction dimension (``K`` forward, ``N`` for ``dX``, tokens ``M`` for ``dW``), e4m3
  everywhere, scales rounded down to powers of two.

The bias is added, and its gradient summed, in float32.

GEMM kernel (argument ``gemm``: ``"auto"`` | ``"native"`` | ``"emulated"``, see
:mod:`torchgraft.ops.kernels`; not named ``kernel``, which Inductor's fallback lowering
reserves): native runs ``torch._scaled_mm`` on the float8 operands,
emulated multiplies the same float8 values cast back to float32 with the ordinary GEMM and
rescales the product; ``"auto"`` takes native only where a one-time probe finds it fast
(CPUs without a float8 kernel run ``_scaled_mm``'s reference loop, ~750x slower than fp32).

Weight-scale cache: :func:`precompute_float8_weight_scales` stores each weight's tensorwise
e4m3 scale, keyed by the weight object, so the forward and grad-input ops reuse it instead
of recomputing amax. An entry is used only while the weight is the same object with the
same ``_version``, storage pointer, shape, dtype and device, i.e. not modified in place
(an optimizer step bumps ``_version``) nor re-pointed with ``.data = ...``. The cached scale
is computed by the same function as the uncached one, so results are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .kernels import check_kernel, float8_matmul
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
from .quant import floor_log2, saturating_cast

__all__ = [
    "RECIPES",
    "cached_float8_weight_scale",
    "clear_float8_weight_scales",
    "float8_linear",
    "float8_linear_grad_input",
    "float8_linear_grad_weight",
    "precompute_float8_weight_scales",
    "tensorwise_scale",
]

RECIPES = ("tensorwise", "rowwise")
_E4M3 = torch.float8_e4m3fn
_E5M2 = torch.float8_e5m2
_AMAX_EPS = 1e-12

# weight -> (fingerprint, scale); weak keys compared by identity.
_WEIGHT_SCALES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_recipe(recipe: str, gemm: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
    check_kernel(gemm)


def tensorwise_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-dim float32 ``fmax / max(amax(|t|), 1e-12)``, computed in float64."""
    amax = t.detach().abs().amax().to(torch.float64)
    return (torch.finfo(dtype).max / amax.clamp(min=_AMAX_EPS)).to(torch.float32)


def _rowwise_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-slice e4m3 scales along ``dim`` (kept as size 1), rounded down to powers of two."""
    amax = t.detach().abs().amax(dim=dim, keepdim=True).to(torch.float64)
    scale = torch.finfo(_E4M3).max / amax.clamp(min=_AMAX_EPS)
    return torch.exp2(floor_log2(scale).to(torch.float32))


def _fingerprint(w: torch.Tensor) -> tuple[object, ...]:
    return (w._version, w.data_ptr(), tuple(w.shape), w.dtype, w.device)


def precompute_float8_weight_scales(weights: Iterable[torch.Tensor]) -> None:
    """Compute and cache the tensorwise e4m3 scale of each weight.

    Call it after every optimizer step (a handler's ``post_optimizer_hook``) with the
    weights of the float8 linears; the ``"tensorwise"`` forward and grad-input ops then
    reuse the scales. An entry is ignored (and the scale recomputed) as soon as the weight
    changes; it disappears when the weight is garbage-collected.

    Raises:
        ValueError: for inference tensors, which have no version counter to validate with.
    """
    for w in weights:
        if w.is_inference():
            raise ValueError("cannot cache the float8 scale of an inference tensor (no _version)")
        _WEIGHT_SCALES[w] = (_fingerprint(w), tensorwise_scale(w, _E4M3))


def clear_float8_weight_scales() -> None:
    """Drop every cached weight scale."""
    _WEIGHT_SCALES.clear()


def cached_float8_weight_scale(w: torch.Tensor) -> torch.Tensor | None:
    """The cached tensorwise scale of ``w``, or ``None`` if absent or no longer valid."""
    entry = _WEIGHT_SCALES.get(w)
    if entry is None or w.is_inference():
        return None
    fingerprint, scale = entry
    return scale if fingerprint == _fingerprint(w) else None


def _weight_scale(w: torch.Tensor, recipe: str) -> torch.Tensor | None:
    """Tensorwise scale of the weight (cached when valid); ``None`` for rowwise."""
    if recipe != "tensorwise":
        return None
    cached = cached_float8_weight_scale(w)
    return tensorwise_scale(w, _E4M3) if cached is None else cached


def _float8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_dtype: torch.dtype,
    recipe: str,
    gemm: str,
    b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``Q(a) @ Q(b)`` for ``a [M, K]``, ``b [K, N]``; ``b`` is always e4m3.

    Rowwise scales are taken along the contraction dim ``K``. ``b_scale`` overrides the
    tensorwise scale of ``b`` (the cached weight scale). ``gemm`` picks the GEMM
    (:func:`torchgraft.ops.kernels.float8_matmul`).
    """
    input_dtype = a.dtype
    a = a.float()
    b = b.float()
    if recipe == "tensorwise":
        a_scale = tensorwise_scale(a, a_dtype)
        if b_scale is None:
            b_scale = tensorwise_scale(b, _E4M3)
    else:
        a_scale = _rowwise_scale(a, dim=1)
        b_scale = _rowwise_scale(b, dim=0)
    a8 = saturating_cast(a * a_scale, a_dtype)
    b8 = saturating_cast(b * b_scale, _E4M3)
    return float8_matmul(a8, b8, a_scale.reciprocal(), b_scale.reciprocal(), gemm, input_dtype)


def _grad_dtype(recipe: str) -> torch.dtype:
    return _E5M2 if recipe == "tensorwise" else _E4M3


@torch.library.custom_op("torchgraft::float8_linear", mutates_args=())
def float8_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with float8 GEMMs; ``recipe`` is ``"tensorwise"`` or
    ``"rowwise"``, ``gemm`` ``"auto"``, ``"native"`` or ``"emulated"`` (see the module
    docstring)."""
    check_linear_args(x, w, bias)
    _check_recipe(recipe, gemm)
    y = _float8_mm(as_2d(x), w.t(), _E4M3, recipe, gemm, b_scale=_weight_scale(w, recipe))
    return finish_linear(y, x, bias)


@torch.library.custom_op("torchgraft::float8_linear_grad_input", mutates_args=())
def float8_linear_grad_input(
    grad: torch.Tensor, w: torch.Tensor, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    """``dX = Q(dY) Q(W)``, contraction over ``N``."""
    _check_recipe(recipe, gemm)
    dx = _float8_mm(
        as_2d(grad), w, _grad_dtype(recipe), recipe, gemm, b_scale=_weight_scale(w, recipe)
    )
    return finish_grad_input(dx, grad)


@torch.library.custom_op("torchgraft::float8_linear_grad_weight", mutates_args=())
def float8_linear_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    """``dW = Q(dY)ᵀ Q(X)``, contraction over the tokens ``M``."""
    _check_recipe(recipe, gemm)
    dw = _float8_mm(as_2d(grad).t(), as_2d(x), _grad_dtype(recipe), recipe, gemm)
    return dw.to(grad.dtype)


@float8_linear.register_fake
def _float8_linear_fake(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    _check_recipe(recipe, gemm)
    return fake_linear(x, w, bias)


float8_linear_grad_input.register_fake(fake_grad_input)
float8_linear_grad_weight.register_fake(fake_grad_weight)
register_linear_autograd(float8_linear, float8_linear_grad_input, float8_linear_grad_weight)
