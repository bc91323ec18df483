"""``torchgraft::int8_linear``: int8 linear layers (weight-only, dynamic, training).

Quantization is symmetric absmax int8 per row (:func:`~torchgraft.ops.quant.int8_absmax_quantize`):
``s = amax_row / 127``, ``q = clamp(round(t / s), -128, 127)``. Int8 GEMMs run through
``torch._int_mm`` (exact int32 accumulation) or its exact float32 emulation, as ``gemm``
chooses (:func:`~torchgraft.ops.kernels.int8_matmul`, :mod:`~torchgraft.ops.kernels`), and are
rescaled by both operands' scales in float32. An int8
GEMM quantizes each operand per row *along that GEMM's contraction dimension*.

Modes (``mode``):

* ``"weight_only"``: ``Y = X Ŵᵀ`` with ``Ŵ`` the per-output-row int8 weight, dequantized;
  ``X`` stays float. Backward: ``dX = dY Ŵ`` (the exact gradient of the forward) and
  ``dW = dYᵀ X`` (straight-through estimator for the weight quantizer), in float32.
* ``"dynamic"``: ``X`` also quantized per token (along ``K``) at run time, forward GEMM
  in int8. Backward (straight-through through both quantizers, on the quantized
  operands): ``dX = dY Ŵ``, ``dW = dYᵀ X̂``, in float32.
* ``"training"``: int8 mixed-precision training. Each GEMM is int8 when its flag is set,
  float32 on the unquantized operands otherwise: ``int8_forward`` (``Y = X Wᵀ``, rows of
  ``X`` and ``W`` along ``K``), ``int8_grad_input`` (``dX = dY W``, rows of ``dY`` and
  columns of ``W`` along ``N``), ``int8_grad_weight`` (``dW = dYᵀ X``, columns of ``dY``
  and ``X`` along the tokens ``M``). The backward operands are the saved high-precision
  ``X`` and ``W``, not the forward's quantized ones.

The three flags select GEMMs only in ``"training"`` mode; other modes reject ``False``.
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

__all__ = ["MODES", "int8_linear", "int8_linear_grad_input", "int8_linear_grad_weight"]

MODES = ("weight_only", "dynamic", "training")


def _check_mode(mode: str, gemm: str, *flags: bool) -> None:
    check_kernel(gemm)
    if mode not in MODES:
        raise ValueError(f"int8 mode must be one of {MODES}, got {mode!r}")
    if mode != "training" and not all(flags):
        raise ValueError(f"int8 GEMM flags only apply to mode='training', not {mode!r}")


def _dequantized(t: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 ``t`` after per-row int8 quantization along ``dim``."""
    q, scale = int8_absmax_quantize(t, dim)
    return q.float() * scale


def _int8_mm(a: torch.Tensor, b: torch.Tensor, gemm: str) -> torch.Tensor:
    """float32 ``Q(a) @ Q(b)`` for ``a [M, K]``, ``b [K, N]``, both quantized along ``K``."""
    qa, sa = int8_absmax_quantize(a, dim=1)
    qb, sb = int8_absmax_quantize(b, dim=0)
    return int8_matmul(qa, qb, gemm).mul_(sa).mul_(sb)


@torch.library.custom_op("torchgraft::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    int8_forward: bool = True,
    int8_grad_input: bool = True,
    int8_grad_weight: bool = True,
    gemm: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with int8 quantization; ``mode`` is ``"weight_only"``,
    ``"dynamic"`` or ``"training"``, ``gemm`` the int8 GEMM's (see the module docstring)."""
    check_linear_args(x, w, bias)
    _check_mode(mode, gemm, int8_forward, int8_grad_input, int8_grad_weight)
    x2d = as_2d(x)
    if mode == "weight_only":
        y = x2d.float() @ _dequantized(w, dim=1).t()
    elif int8_forward:
        y = _int8_mm(x2d, w.t(), gemm)
    else:
        y = x2d.float() @ w.float().t()
    return finish_linear(y, x, bias)


@torch.library.custom_op("torchgraft::int8_linear_grad_input", mutates_args=())
def int8_linear_grad_input(
    grad: torch.Tensor, w: torch.Tensor, mode: str, int8_grad_input: bool, gemm: str = "auto"
) -> torch.Tensor:
    """``dX`` of :func:`int8_linear` (``dY W``; contraction over ``N``)."""
    _check_mode(mode, gemm, int8_grad_input)
    g = as_2d(grad)
    if mode != "training":
        dx = g.float() @ _dequantized(w, dim=1)
    elif int8_grad_input:
        dx = _int8_mm(g, w, gemm)
    else:
        dx = g.float() @ w.float()
    return finish_grad_input(dx, grad)


@torch.library.custom_op("torchgraft::int8_linear_grad_weight", mutates_args=())
def int8_linear_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, mode: str, int8_grad_weight: bool, gemm: str = "auto"
) -> torch.Tensor:
    """``dW`` of :func:`int8_linear` (``dYᵀ X``; contraction over the tokens ``M``)."""
    _check_mode(mode, gemm, int8_grad_weight)
    g = as_2d(grad)
    x2d = as_2d(x)
    if mode == "dynamic":
        dw = g.float().t() @ _dequantized(x2d, dim=1)
    elif mode == "training" and int8_grad_weight:
        dw = _int8_mm(g.t(), x2d, gemm)
    else:
        dw = g.float().t() @ x2d.float()
    return dw.to(grad.dtype)


@int8_linear.register_fake
def _int8_linear_fake(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    int8_forward: bool = True,
    int8_grad_input: bool = True,
    int8_grad_weight: bool = True,
    gemm: str = "auto",
) -> torch.Tensor:
    _check_mode(mode, gemm, int8_forward, int8_grad_input, int8_grad_weight)
    return fake_linear(x, w, bias)


int8_linear_grad_input.register_fake(fake_grad_input)
int8_linear_grad_weight.register_fake(fake_grad_weight)
register_linear_autograd(
    int8_linear,
    grad_input=lambda grad, w, mode, _fwd, int8_grad_input, _gw, gemm: int8_linear_grad_input(
        grad, w, mode, int8_grad_input, gemm
    ),
    grad_weight=lambda grad, x, mode, _fwd, _gi, int8_grad_weight, gemm: int8_linear_grad_weight(
        grad, x, mode, int8_grad_weight, gemm
    ),
)
