"""Plumbing shared by the ``torchgraft::*_linear`` custom ops.

Every op here is a drop-in for ``F.linear(x, w, bias)``: ``x [..., K]``, ``w [N, K]``,
optional ``bias [N]``, output ``[..., N]`` in ``x.dtype``. Each format defines three custom
ops with the same layout:

* ``<fmt>_linear(x, w, bias, *config)``: forward, ``Y = X Wᵀ + b``;
* ``<fmt>_linear_grad_input(grad, w, ...)``: ``dX = dY W``, shaped like ``x``;
* ``<fmt>_linear_grad_weight(grad, x, ...)``: ``dW = dYᵀ X``, shaped like ``w``.

:func:`register_linear_autograd` wires the last two into the first one's backward (plus the
bias gradient, summed in float32), so the backward graph is made of custom ops and survives
``torch.export`` / ``torch.compile`` unchanged. A format may also hand its forward's
quantized operands to the eager backward (:class:`SavedOperands`) instead of quantizing
``x`` and ``w`` again. The GEMMs run on 2-D views: leading
dimensions of ``x`` and ``grad`` are flattened into the token dimension ``M``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "SavedOperands",
    "as_2d",
    "check_linear_args",
    "fake_grad_input",
    "fake_grad_weight",
    "fake_linear",
    "finish_grad_input",
    "finish_linear",
    "linear_ops",
    "own_tensor",
    "register_linear_autograd",
]

_LINEAR_OPS: set[torch._ops.OpOverload] = set()


def linear_ops() -> frozenset[torch._ops.OpOverload]:
    """Every forward op registered with :func:`register_linear_autograd`: a drop-in for
    ``F.linear`` (argument 1 is the weight ``[N, K]``), e.g. for tensor parallelism to
    know which dim of a weight holds the output features."""
    return frozenset(_LINEAR_OPS)


def check_linear_args(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``(x, w, bias)`` are valid ``F.linear`` arguments."""
    if x.dim() < 1 or w.dim() != 2:
        raise ValueError(
            f"expected x [..., K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match w {tuple(w.shape)} (K differs)")
    if x.dtype != w.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"x, w and bias must share a dtype, got {x.dtype}, {w.dtype}, "
            f"{None if bias is None else bias.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """``t [..., C]`` viewed (or copied) as ``[prod(...), C]``."""
    return t.reshape(-1, t.shape[-1])


def finish_linear(y2d: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add ``bias`` in float32 to the float32 GEMM result ``y2d [M, N]``, restore ``x``'s
    leading dimensions and cast to ``x.dtype``."""
    if bias is not None:
        y2d = y2d + bias.float()
    return own_tensor(y2d.reshape(*x.shape[:-1], y2d.shape[-1]).to(x.dtype))


def finish_grad_input(dx2d: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Shape the float32 ``dX [M, K]`` like the forward input (``grad``'s leading dims)."""
    return own_tensor(dx2d.reshape(*grad.shape[:-1], dx2d.shape[-1]).to(grad.dtype))


def own_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own when it is a view of an op's temporary: the same memory,
    no copy, without the view bookkeeping. Autograd forbids modifying in place a custom
    op's output that is a view (transformers' Falcon adds its attention output in place to
    its MLP projection's), while a plain tensor is fine."""
    return t if t._base is None else t.detach()  # detach: same memory, not a view


def fake_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Fake (meta) implementation of a ``*_linear`` forward op (after its config checks)."""
    check_linear_args(x, w, bias)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def fake_grad_input(grad: torch.Tensor, w: torch.Tensor, *config: Any) -> torch.Tensor:
    """Fake implementation of a ``*_linear_grad_input`` op: ``dX [..., K]``."""
    return grad.new_empty((*grad.shape[:-1], w.shape[1]))


def fake_grad_weight(grad: torch.Tensor, x: torch.Tensor, *config: Any) -> torch.Tensor:
    """Fake implementation of a ``*_linear_grad_weight`` op: ``dW [N, K]``."""
    return grad.new_empty((grad.shape[-1], x.shape[-1]))


def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """``dY`` summed over all but the last dimension, accumulated in float32."""
    return as_2d(grad).sum(0, dtype=torch.float32).to(grad.dtype)


class SavedOperands(Protocol):
    """What a forward op's implementation computed that its backward can reuse.

    When the forward ran eagerly, ``take`` returns the tensors to save for the backward of
    the call that produced ``output`` (e.g. the quantized ``x`` and ``w``), and the backward
    calls ``backward`` with them instead of the grad ops. ``take`` returns ``None`` when it
    has nothing for ``output`` (under tracing, or for a configuration it does not cover):
    the grad ops run then, so traced graphs keep their custom-op backward.
    """

    def take(
        self, output: torch.Tensor, needs_x: bool, needs_w: bool
    ) -> list[torch.Tensor | None] | None: ...

    def backward(
        self,
        saved: Sequence[torch.Tensor | None],
        grad: torch.Tensor,
        needs_x: bool,
        needs_w: bool,
        *config: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


def register_linear_autograd(
    op: Any,
    grad_input: Callable[..., torch.Tensor],
    grad_weight: Callable[..., torch.Tensor],
    reuse: SavedOperands | None = None,
) -> None:
    """Register the backward of the forward custom op ``op(x, w, bias, *config)``.

    ``grad_input(grad, w, *config)`` and ``grad_weight(grad, x, *config)`` must compute the
    two GEMM gradients by calling custom ops; each is only called when that gradient is
    needed. The bias gradient is ``dY`` summed in float32. ``x`` is saved only if ``w``
    needs a gradient and ``w`` only if ``x`` does, unquantized: the quantized operands are
    recomputed in backward (deterministically, so they equal the forward's) unless ``reuse``
    hands over the forward's (then ``reuse.backward`` computes ``dX`` and ``dW``).
    """

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _bias, *config = inputs
        needs_x, needs_w = ctx.needs_input_grad[:2]
        saved = None if reuse is None else reuse.take(output, needs_x, needs_w)
        ctx.reused = saved is not None
        ctx.save_for_backward(*(saved or (x if needs_w else None, w if needs_x else None)))
        ctx.config = config

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs_x, needs_w, needs_bias = ctx.needs_input_grad[:3]
        if ctx.reused:
            dx, dw = reuse.backward(ctx.saved_tensors, grad, needs_x, needs_w, *ctx.config)
        else:
            x, w = ctx.saved_tensors
            dx = grad_input(grad, w, *ctx.config) if needs_x else None
            dw = grad_weight(grad, x, *ctx.config) if needs_w else None
        dbias = _bias_grad(grad) if needs_bias else None
        return (dx, dw, dbias, *(None for _ in ctx.config))

    op.register_autograd(backward, setup_context=setup_context)
    _LINEAR_OPS.add(op._opoverload)
