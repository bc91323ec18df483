"""``torchgraft::bitnet_linear``: BitNet b1.58 linear (ternary weights, int8 activations).

* Weights: ``γ = max(mean(|W|), 1e-5)``, ``W_t = clip(round(W / γ), -1, 1)``; the weight
  used is ``Ŵ = W_t γ``.
* Activations, per token (row along ``K``): ``s = 127 / max(amax_row, 1e-5)``,
  ``x_q = clamp(round(x s), -128, 127)``, ``X̂ = x_q / s`` (the shared int8 quantizer
  computes ``x / (1 / s)``).
* Forward: ``Y = X̂ Ŵᵀ``, computed as the exact int8 GEMM ``x_q W_tᵀ`` (``torch._int_mm``,
  or its exact float32 emulation, as ``gemm`` chooses: :mod:`~torchgraft.ops.kernels`)
  rescaled by ``γ / s`` in float32, then the bias in float32.
* Backward: straight-through estimator as in the BitNet reference code
  (``x + (quant(x) - x).detach()``): the gradients are those of ``X̂ Ŵᵀ`` treating both
  quantizers as the identity, with the quantized tensors in the GEMMs:
  ``dX = dY Ŵ``, ``dW = dYᵀ X̂`` (float32, unquantized ``dY``).
"""

from __future__ import annotations

import torch

from .kernels import check_kernel, int8_matmul
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
from .quant import int8_absmax_quantize

__all__ = [
    "bitnet_linear",
    "bitnet_linear_grad_input",
    "bitnet_linear_grad_weight",
    "ternary_quantize",
]

_EPS = 1e-5


def ternary_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_t, γ)``: the int8 ternary weight in ``{-1, 0, 1}`` and its 0-dim float32 scale."""
    w = w.float()
    gamma = w.abs().mean().clamp(min=_EPS)
    return (w / gamma).round().clamp(-1, 1).to(torch.int8), gamma


def _quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 ``(x_q, 1 / s)`` of ``x2d [M, K]``."""
    return int8_absmax_quantize(x2d, dim=1, eps=_EPS)


@torch.library.custom_op("torchgraft::bitnet_linear", mutates_args=())
def bitnet_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gemm: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` as BitNet b1.58 (see the module docstring)."""
    check_linear_args(x, w, bias)
    check_kernel(gemm)
    x_q, x_scale = _quantize_activations(as_2d(x))
    w_t, gamma = ternary_quantize(w)
    y = int8_matmul(x_q, w_t.t(), gemm).mul_(x_scale * gamma)
    return finish_linear(y, x, bias)


@torch.library.custom_op("torchgraft::bitnet_linear_grad_input", mutates_args=())
def bitnet_linear_grad_input(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``dX = dY Ŵ`` (straight-through estimator)."""
    w_t, gamma = ternary_quantize(w)
    return finish_grad_input(as_2d(grad).float() @ (w_t.float() * gamma), grad)


@torch.library.custom_op("torchgraft::bitnet_linear_grad_weight", mutates_args=())
def bitnet_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dW = dYᵀ X̂`` (straight-through estimator)."""
    x_q, x_scale = _quantize_activations(as_2d(x))
    return (as_2d(grad).float().t() @ (x_q.float() * x_scale)).to(grad.dtype)


@bitnet_linear.register_fake
def _bitnet_linear_fake(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gemm: str = "auto"
) -> torch.Tensor:
    check_kernel(gemm)
    return fake_linear(x, w, bias)


bitnet_linear_grad_input.register_fake(fake_grad_input)
bitnet_linear_grad_weight.register_fake(fake_grad_weight)
# The backward GEMMs are float32 (unquantized dY): ``gemm`` only concerns the forward.
register_linear_autograd(
    bitnet_linear,
    grad_input=lambda grad, w, _gemm: bitnet_linear_grad_input(grad, w),
    grad_weight=lambda grad, x, _gemm: bitnet_linear_grad_weight(grad, x),
)
