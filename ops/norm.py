"""``torchgraft::rms_norm``: the six-op RMSNorm ``x * rsqrt(mean(x²) + eps) * w`` as one op."""

from __future__ import annotations

import torch


@torch.library.custom_op("torchgraft::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed exactly as the unfused six-op pattern."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Like empty_like(broadcast_tensors(x, weight)[0]); broadcast_shapes on the sizes costs
    # a tenth of broadcasting the fake tensors, and x is usually already that shape.
    shape = torch.broadcast_shapes(x.shape, weight.shape)
    return torch.empty_like(x if x.shape == shape else x.expand(shape))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
    normed = x * inv_rms
    grad_normed = grad * weight
    grad_x = inv_rms * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    grad_w = (grad * normed).reshape(-1, weight.shape[-1]).sum(0)
    return grad_x, grad_w, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)
