"""``torchgraft::chunked_linear_cross_entropy``: output projection + cross-entropy in row
chunks, never materializing the ``[tokens × vocab]`` logits.

``chunked_linear_cross_entropy(h, w, labels, chunk_size, ignore_index, reduction, out_dtype,
softcap)`` equals ``F.cross_entropy(F.linear(h, w).reshape(-1, V).to(out_dtype),
labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)`` for ``h [..., D]``,
``w [V, D]`` and integer ``labels`` with one entry per row of ``h``; with ``softcap`` the
logits are soft-capped first, ``softcap * tanh(logits / softcap)`` (Gemma2's final logit
soft-capping), per chunk. ``reduction`` is ``"mean"`` (over the labels that
are not ``ignore_index``; NaN when all are ignored, like ``F.cross_entropy``), ``"sum"`` or
``"none"`` (per-row losses ``[N]``, 0 on ignored rows). ``out_dtype`` (default ``h.dtype``)
is the dtype of the returned loss, i.e. the dtype the unchunked graph ran the
cross-entropy in.

Forward: per chunk of ``chunk_size`` rows, ``logits_c = h_c Wᵀ`` (GEMM in ``h.dtype``, then
float32), ``loss_r = logsumexp(logits_r) − logits_r[label_r]``, the exponentials computed
in place: one ``[chunk_size, V]`` float32 buffer at a time (plus the GEMM's output when
``h`` is not float32). Nothing but ``h``, ``w`` and ``labels`` is saved for backward.

Backward (``torchgraft::chunked_linear_cross_entropy_backward``): recomputes each chunk's
logits and ``softmax``, subtracts 1 at the label, scales each row by its loss weight
(``grad / count`` for mean, ``grad`` for sum, ``grad[r]`` for none; 0 on ignored rows),
with ``softcap`` multiplies by the cap's derivative ``1 − tanh²(logits / softcap)`` (a
second chunk buffer), and accumulates ``dh_c = dlogits_c W`` and ``dW += dlogits_cᵀ h_c`` (float32): one chunk buffer
plus ``dh`` and a float32 ``dW``. The extra cost is one more ``[N, D] × [D, V]`` GEMM than
the unchunked backward. The backward op has no autograd formula (no double backward).

The softmax statistics are always float32, so for float32 inputs the result equals the
unchunked graph up to summation order; for bfloat16 it is at least as accurate.
"""

from __future__ import annotations

import torch

__all__ = [
    "REDUCTIONS",
    "chunked_linear_cross_entropy",
    "chunked_linear_cross_entropy_backward",
]

REDUCTIONS = ("mean", "sum", "none")


def _check_args(
    h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk_size: int, reduction: str
) -> None:
    if w.dim() != 2 or h.dim() < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"chunked_linear_cross_entropy expects h [..., D] and w [V, D], got "
            f"{tuple(h.shape)} and {tuple(w.shape)}"
        )
    if h.dtype != w.dtype:
        raise ValueError(f"h and w must share a dtype, got {h.dtype} and {w.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.numel() * h.shape[-1] != h.numel():
        raise ValueError(
            f"labels {tuple(labels.shape)} must have one entry per row of h {tuple(h.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _chunk_logits(h_c: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """A chunk's float32 logits, soft-capped (in place) when ``softcap`` is set."""
    logits = (h_c @ w.t()).float()
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite ``logits`` with ``exp(logits - rowmax)``; return it and the row max. In
    place, so a chunk costs one ``[chunk_size, V]`` buffer (``torch.logsumexp`` and
    ``torch.softmax`` allocate a second one)."""
    row_max = logits.amax(-1, keepdim=True)
    return logits.sub_(row_max).exp_(), row_max


def _targets(y_c: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to count, and labels safe to gather (ignored rows point at class 0)."""
    valid = y_c != ignore_index
    return valid, torch.where(valid, y_c, 0).unsqueeze(1)


@torch.library.custom_op("torchgraft::chunked_linear_cross_entropy", mutates_args=())
def chunked_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    out_dtype: torch.dtype | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(h, w)`` (soft-capped by ``softcap`` if set) against
    ``labels``, ``chunk_size`` rows at a time."""
    _check_args(h, w, labels, chunk_size, reduction)
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    losses = torch.empty(y.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, y.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logits = _chunk_logits(h2[rows], w, softcap)
        valid, target = _targets(y[rows], ignore_index)
        target_logit = logits.gather(1, target).squeeze(1)
        exp, row_max = _exp_shifted_(logits)
        loss = exp.sum(-1).log_() + row_max.squeeze(1) - target_logit  # logsumexp - target
        losses[rows] = loss.masked_fill(~valid, 0.0)
        del logits, exp  # free this chunk before the next one is computed
    dtype = out_dtype or h.dtype
    if reduction == "none":
        return losses.to(dtype)
    total = losses.sum()
    if reduction == "mean":
        total = total / (y != ignore_index).sum()
    return total.to(dtype)


@chunked_linear_cross_entropy.register_fake
def _(h, w, labels, chunk_size, ignore_index=-100, reduction="mean", out_dtype=None, softcap=None):
    _check_args(h, w, labels, chunk_size, reduction)
    shape = (labels.numel(),) if reduction == "none" else ()
    return h.new_empty(shape, dtype=out_dtype or h.dtype)


@torch.library.custom_op("torchgraft::chunked_linear_cross_entropy_backward", mutates_args=())
def chunked_linear_cross_entropy_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dw)`` of :func:`chunked_linear_cross_entropy` given the loss gradient ``grad``."""
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    valid = y != ignore_index
    if reduction == "none":
        row_weight = grad.float().reshape(-1) * valid
    else:
        scale = grad.float() / valid.sum() if reduction == "mean" else grad.float()
        row_weight = scale * valid
    dh = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for start in range(0, y.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h_c = h2[rows]
        logits = _chunk_logits(h_c, w, softcap)
        # d(softcap * tanh(z / softcap)) / dz = 1 - (capped / softcap)^2, before exp_ overwrites
        dcap = None if softcap is None else 1.0 - (logits / softcap).square_()
        dlogits, _ = _exp_shifted_(logits)
        dlogits.div_(dlogits.sum(-1, keepdim=True))  # softmax
        _, target = _targets(y[rows], ignore_index)
        dlogits.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=dlogits.dtype))
        dlogits *= row_weight[rows].unsqueeze(1)
        if dcap is not None:
            dlogits *= dcap
        dh[rows] = dlogits.to(h.dtype) @ w
        dw.addmm_(dlogits.t(), h_c.float())
        del logits, dlogits, dcap  # free this chunk before the next one is computed
    return dh.view(h.shape), dw.to(w.dtype)  # both contiguous, as the fake promises


@chunked_linear_cross_entropy_backward.register_fake
def _(grad, h, w, labels, chunk_size, ignore_index=-100, reduction="mean", softcap=None):
    return h.new_empty(h.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output) -> None:
    h, w, labels, chunk_size, ignore_index, reduction, _out_dtype, softcap = inputs
    ctx.save_for_backward(h, w, labels)
    ctx.config = (chunk_size, ignore_index, reduction, softcap)


def _backward(ctx, grad: torch.Tensor):
    h, w, labels = ctx.saved_tensors
    dh, dw = torch.ops.torchgraft.chunked_linear_cross_entropy_backward(
        grad, h, w, labels, *ctx.config
    )
    return dh, dw, None, None, None, None, None, None


chunked_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
