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
emulated multiplies the same float8 values in float32 with the ordinary GEMM and rescales
the product; ``"auto"`` takes native only where a one-time probe finds it fast (CPUs without
a float8 kernel run ``_scaled_mm``'s reference loop, ~750x slower than fp32). Operands are
quantized for the path that runs: float8 bytes for native, their float32 values for
emulation (:func:`~torchgraft.ops.quant.float8_values`, no float8 bytes in between).

Each tensor is quantized once per training step (tensorwise, eager autograd): linears that
read the same input (the q, k and v projections) share its ``Q(X)``; the forward hands
``Q(X)`` and ``Q(W)`` to its own backward (:class:`~torchgraft.ops.linear.SavedOperands`),
which saves them instead of ``x`` and ``w`` and quantizes ``dY`` once for both GEMMs. The
scales, hence the values, are those the grad-input and grad-weight ops compute from ``x``,
``w`` and ``dY``, which traced graphs (``torch.export``, ``torch.compile``) call as before.

Weight-scale cache: :func:`precompute_float8_weight_scales` stores each weight's tensorwise
e4m3 scale, keyed by the weight object, so the forward and grad-input ops reuse it instead
of recomputing amax. An entry is used only while the weight is the same object (or its
transpose ``w.t()``, as the ``[in, out]`` linear forms pass it) with the same ``_version``,
storage pointer, shape, dtype and device, i.e. not modified in place
(an optimizer step bumps ``_version``) nor re-pointed with ``.data = ...``. The cached scale
is computed by the same function as the uncached one, so results are bit-identical.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .kernels import Choice, check_kernel, float8_matmul, resolve
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
from .quant import abs_max, float8_to_float32, float8_values_, floor_log2, saturating_cast

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
# forward input -> ((fingerprint, recipe, path), Q(x)); weak keys compared by identity.
_INPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_recipe(recipe: str, gemm: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
    check_kernel(gemm)


def tensorwise_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-dim float32 ``fmax / max(amax(|t|), 1e-12)``, computed in float64."""
    amax = abs_max(t.detach()).to(torch.float64)
    return (torch.finfo(dtype).max / amax.clamp(min=_AMAX_EPS)).to(torch.float32)


def _rowwise_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-slice e4m3 scales along ``dim`` (kept as size 1), rounded down to powers of two."""
    amax = abs_max(t.detach(), dim).to(torch.float64)
    scale = torch.finfo(_E4M3).max / amax.clamp(min=_AMAX_EPS)
    return torch.exp2(floor_log2(scale).to(torch.float32))


def _fingerprint(w: torch.Tensor) -> tuple[object, ...]:
    return (w._version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)


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
    """The cached tensorwise scale of ``w`` or, when ``w`` is the transpose ``v.t()`` of a
    cached weight ``v`` (the same values, so the same scale), of ``v``; ``None`` if absent or
    no longer valid."""
    if w.is_inference():
        return None
    entry = _WEIGHT_SCALES.get(w)
    if entry is None and _is_transpose_of(w, w._base):
        w = w._base
        entry = _WEIGHT_SCALES.get(w)
    if entry is None:
        return None
    fingerprint, scale = entry
    return scale if fingerprint == _fingerprint(w) else None


def _is_transpose_of(w: torch.Tensor, base: torch.Tensor | None) -> bool:
    return (
        base is not None
        and w.dim() == base.dim() == 2
        and w.shape == base.shape[::-1]
        and w.stride() == base.stride()[::-1]
        and w.data_ptr() == base.data_ptr()
    )


def _weight_scale(w: torch.Tensor, recipe: str) -> torch.Tensor | None:
    """Tensorwise scale of the weight (cached when valid); ``None`` for rowwise."""
    if recipe != "tensorwise":
        return None
    cached = cached_float8_weight_scale(w)
    return tensorwise_scale(w, _E4M3) if cached is None else cached


class _Operand(NamedTuple):
    """A GEMM operand quantized to float8: ``data`` as a GEMM path takes it (the float8
    tensor for native, its float32 values for emulation) and the inverse scale (0-dim, or
    one per row / column)."""

    data: torch.Tensor
    inverse: torch.Tensor
    dtype: torch.dtype
    """The float8 format."""

    def t(self) -> _Operand:
        """The transposed operand: row scales ``[M, 1]`` become column scales ``[1, M]``
        (reshaped, not transposed: ``_scaled_mm`` wants unit strides)."""
        inverse = self.inverse
        if inverse.dim() == 2:
            inverse = inverse.reshape(inverse.shape[::-1])
        return _Operand(self.data.t(), inverse, self.dtype)

    def for_path(self, path: Choice) -> _Operand:
        """The same values as ``path`` takes them (exact conversions either way)."""
        if (self.data.dtype == self.dtype) == (path == "native"):
            return self
        data = self.data.to(self.dtype) if path == "native" else float8_to_float32(self.data)
        return self._replace(data=data)


def _path(gemm: str, device: torch.device, a_dtype: torch.dtype) -> Choice:
    """The GEMM path for an ``a_dtype`` x e4m3 product (:func:`~.kernels.resolve`)."""
    return resolve(gemm, "float8", device, (a_dtype, _E4M3))


def _quantize(
    t: torch.Tensor,
    dtype: torch.dtype,
    recipe: str,
    dim: int,
    path: Choice,
    scale: torch.Tensor | None = None,
) -> _Operand:
    """``t [R, C]`` quantized to ``dtype`` for ``path``: one tensorwise scale (``scale``, the
    cached weight scale, when given) or, rowwise, one scale per slice along ``dim``."""
    t = t.float()
    if recipe == "tensorwise":
        scale = tensorwise_scale(t, dtype) if scale is None else scale
    else:
        scale = _rowwise_scale(t, dim)
    scaled = t * scale
    if path == "native":
        data = saturating_cast(scaled, dtype)
    else:  # a tensorwise scale maps amax to fmax (up to float32 rounding): no clamp needed
        data = float8_values_(scaled, dtype, clamp=recipe != "tensorwise")
    return _Operand(data, scale.reciprocal(), dtype)


def _forward_input(x: torch.Tensor, recipe: str, path: Choice) -> _Operand:
    """``Q(X)`` of a forward, shared by the linears that read the same ``x`` (the q, k and v
    projections of one norm's output) in eager autograd, so it is computed and saved once.

    Kept while ``x`` lives, and used only while ``x`` is the same object with the same
    ``_version``, storage, shape and strides: the condition under which autograd itself
    reuses a saved tensor. Only for plain tensors that require grad, i.e. recorded by eager
    autograd: inside compiled code (whose buffers are overwritten without a version bump
    when Inductor reuses them) and without autograd, ``x`` is quantized per call.
    """
    if type(x) is not torch.Tensor or not x.requires_grad:
        return _quantize(as_2d(x), _E4M3, recipe, 1, path)
    key = (_fingerprint(x), recipe, path)
    entry = _INPUTS.get(x)
    if entry is not None and entry[0] == key:
        return entry[1]
    operand = _quantize(as_2d(x), _E4M3, recipe, 1, path)
    _INPUTS[x] = (key, operand)
    return operand


def _gemm(a: _Operand, b: _Operand, path: Choice, input_dtype: torch.dtype) -> torch.Tensor:
    """float32 ``Q(a) @ Q(b)`` for ``a [M, K]``, ``b [K, N]`` quantized along ``K``."""
    a, b = a.for_path(path), b.for_path(path)
    return float8_matmul(a.data, b.data, a.inverse, b.inverse, path, input_dtype)


def _grad_input(grad: torch.Tensor, g: _Operand, w: _Operand, path: Choice) -> torch.Tensor:
    """``dX = Q(dY) Q(W)`` shaped like the forward input; ``g`` is ``grad`` quantized."""
    return finish_grad_input(_gemm(g, w, path, grad.dtype), grad)


def _grad_weight(grad: torch.Tensor, g_t: _Operand, x: _Operand, path: Choice) -> torch.Tensor:
    """``dW = Q(dY)ᵀ Q(X)``; ``g_t`` is ``grad`` transposed and quantized."""
    return _gemm(g_t, x, path, grad.dtype).to(grad.dtype)


class _ForwardOperands(threading.local):
    """The tensorwise forward's ``Q(X)`` and ``Q(W)``, kept for its own backward
    (:class:`~torchgraft.ops.linear.SavedOperands`).

    The forward op stores its operands beside a weak reference to its output; autograd's
    ``setup_context`` for that op call runs next, on this thread, with that very output
    object, and takes them. Under tracing (fake tensors) or without autograd nothing takes
    them and the next forward replaces them; the backward then calls the grad ops.
    """

    def __init__(self) -> None:
        self._last: tuple[weakref.ref[torch.Tensor], _Operand, _Operand] | None = None

    def put(self, output: torch.Tensor, x: _Operand, w: _Operand) -> None:
        self._last = (weakref.ref(output), x, w)

    def take(
        self, output: torch.Tensor, needs_x: bool, needs_w: bool
    ) -> list[torch.Tensor | None] | None:
        """``[Q(X), its inverse scale, Q(W), its inverse scale]`` of the forward that made
        ``output`` (``Q(X)`` only if ``w`` needs a gradient, ``Q(W)`` only if ``x`` does)."""
        last, self._last = self._last, None
        if last is None or last[0]() is not output or not (needs_x or needs_w):
            return None
        _, x, w = last
        return [x.data if needs_w else None, x.inverse, w.data if needs_x else None, w.inverse]

    def backward(
        self,
        saved: Sequence[torch.Tensor | None],
        grad: torch.Tensor,
        needs_x: bool,
        needs_w: bool,
        recipe: str,
        gemm: str = "auto",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``dX`` and ``dW`` from the saved operands, ``dY`` quantized once for both."""
        x_data, x_inverse, w_data, w_inverse = saved
        path = _path(gemm, grad.device, _grad_dtype(recipe))
        g = _quantize(as_2d(grad), _grad_dtype(recipe), recipe, 1, path)
        dx = _grad_input(grad, g, _Operand(w_data, w_inverse, _E4M3), path) if needs_x else None
        dw = (
            _grad_weight(grad, g.t(), _Operand(x_data, x_inverse, _E4M3), path) if needs_w else None
        )
        return dx, dw


_FORWARD_OPERANDS = _ForwardOperands()


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
    path = _path(gemm, x.device, _E4M3)
    xq = _forward_input(x, recipe, path)
    wq = _quantize(w, _E4M3, recipe, 1, path, _weight_scale(w, recipe))
    y = finish_linear(_gemm(xq, wq.t(), path, x.dtype), x, bias)
    if recipe == "tensorwise":  # the backward's operands are the same (rowwise: other axes)
        _FORWARD_OPERANDS.put(y, xq, wq)
    return y


@torch.library.custom_op("torchgraft::float8_linear_grad_input", mutates_args=())
def float8_linear_grad_input(
    grad: torch.Tensor, w: torch.Tensor, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    """``dX = Q(dY) Q(W)``, contraction over ``N``."""
    _check_recipe(recipe, gemm)
    path = _path(gemm, grad.device, _grad_dtype(recipe))
    g = _quantize(as_2d(grad), _grad_dtype(recipe), recipe, 1, path)
    return _grad_input(
        grad, g, _quantize(w, _E4M3, recipe, 0, path, _weight_scale(w, recipe)), path
    )


@torch.library.custom_op("torchgraft::float8_linear_grad_weight", mutates_args=())
def float8_linear_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    """``dW = Q(dY)ᵀ Q(X)``, contraction over the tokens ``M``."""
    _check_recipe(recipe, gemm)
    path = _path(gemm, grad.device, _grad_dtype(recipe))
    g = _quantize(as_2d(grad), _grad_dtype(recipe), recipe, 0, path)
    return _grad_weight(grad, g.t(), _quantize(as_2d(x), _E4M3, recipe, 0, path), path)


@float8_linear.register_fake
def _float8_linear_fake(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, recipe: str, gemm: str = "auto"
) -> torch.Tensor:
    _check_recipe(recipe, gemm)
    return fake_linear(x, w, bias)


float8_linear_grad_input.register_fake(fake_grad_input)
float8_linear_grad_weight.register_fake(fake_grad_weight)
register_linear_autograd(
    float8_linear, float8_linear_grad_input, float8_linear_grad_weight, _FORWARD_OPERANDS
)
