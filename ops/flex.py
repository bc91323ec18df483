"""``torchgraft::flex_attention``: causal (optionally document-masked) attention through
``torch.nn.attention.flex_attention``.

``flex_attention(q, k, v, doc_ids, scale, enable_gqa) -> (out, lse)`` computes
``softmax(q kᵀ · scale + mask) v`` per head, where the mask allows key ``j`` for query ``i``
when ``j <= i`` (causal, top-left aligned like ``scaled_dot_product_attention(is_causal=True)``)
and, if ``doc_ids [B, L]`` is given, ``doc_ids[b, i] == doc_ids[b, j]`` (document masking:
each packed document attends only to itself). ``q [B, H, L, E]``, ``k [B, Hkv, S, E]``,
``v [B, Hkv, S, Ev]``; ``out [B, H, L, Ev]`` in ``q.dtype``; ``lse [B, H, L]`` is the float32
natural-log logsumexp of each row's masked, scaled scores. ``enable_gqa`` lets ``H`` be a
multiple of ``Hkv`` (query head ``h`` uses kv head ``h // (H // Hkv)``), as in SDPA.

Why a custom op, not ``flex_attention`` called in the graph (measured with torch 2.13 CPU):

* ``flex_attention`` takes a ``BlockMask`` built from a Python ``mask_mod`` closure, which is
  not a graph value: a replacement cannot create it, and the exported form of flex (a
  higher-order op with sub-graph attributes) cannot be written as a rule's replacement.
  As an op, the mask is described by tensors (``doc_ids``) and rebuilt inside the kernel.
* FlexAttention has no backward on CPU, eager or compiled ("FlexAttention does not support
  backward on CPU"). The autograd formula here is a second op,
  ``torchgraft::flex_attention_backward``, that recomputes the probabilities from the saved
  ``lse`` in blocks of query rows (FlashAttention-2 backward) with the same ``mask_mod``, so
  it never holds more than ``[B, H, block, S]`` scores.
* Custom ops with fake and autograd implementations survive ``torch.export`` and
  ``torch.compile`` (the op is opaque to both) and can get a DTensor sharding rule (heads are
  independent: shard ``q, k, v, out, lse`` on dim 1, replicate ``doc_ids``).

The forward runs ``flex_attention`` eagerly: on CPU it materializes the ``[B, H, L, S]``
scores (flex's unfused path; steady state ~130 ms for ``B=8, H=16, L=128, E=16`` against
~17 ms for SDPA, measured on 2 cores). The causal ``BlockMask`` depends only on
``(L, S, device)`` and is cached; the document one is built per call from ``doc_ids``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

__all__ = [
    "causal_mask",
    "document_ids",
    "document_mask",
    "flex_attention",
    "flex_attention_backward",
]

aten = torch.ops.aten

BACKWARD_BLOCK = 128
"""Query rows per block in the backward: it holds ``[B, H, BACKWARD_BLOCK, S]`` scores."""

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
    """``mask_mod`` of causal attention: key ``kv_idx`` is visible from query ``q_idx``."""
    return q_idx >= kv_idx


def document_mask(doc_ids: torch.Tensor) -> MaskMod:
    """``mask_mod`` of causal attention within documents: ``doc_ids [B, L]`` names each
    token's document; query and key must be in the same one.

    Like every ``mask_mod`` here it works on scalars (``create_block_mask`` vmaps it) and on
    broadcastable index tensors (the backward calls it on blocks of indices).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def document_ids(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Document id of each token of ``tokens [B, L]``: the number of end-of-document tokens
    strictly before it in its row, so an EOD token belongs to the document it ends (the
    convention of torchtitan's document mask).

    Written with ``aten`` ops so that a rule's replacement can trace it.
    """
    is_eod = aten.to.dtype(aten.eq.Scalar(tokens, eod_token), torch.int64)
    return aten.sub.Tensor(aten.cumsum.default(is_eod, -1), is_eod)


def _mask_mod(doc_ids: torch.Tensor | None) -> MaskMod:
    return causal_mask if doc_ids is None else document_mask(doc_ids)


@functools.cache
def _causal_block_mask(q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    return create_block_mask(causal_mask, None, None, q_len, kv_len, device=device)


def _block_mask(doc_ids: torch.Tensor | None, q_len: int, kv_len: int, device) -> BlockMask:
    if doc_ids is None:
        return _causal_block_mask(q_len, kv_len, torch.device(device))
    return create_block_mask(
        document_mask(doc_ids), doc_ids.shape[0], None, q_len, kv_len, device=device
    )


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, gqa: bool
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flex_attention expects q, k, v of shape [B, H, L, E], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    if k.shape[2] != v.shape[2] or k.shape[1] != v.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"flex_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share B, H and S, "
            f"and q {tuple(q.shape)} and k the head dim E"
        )
    if heads != kv_heads and not (gqa and heads % kv_heads == 0):
        raise ValueError(
            f"flex_attention: q has {heads} heads and k, v {kv_heads}; set enable_gqa=True "
            "with a number of query heads that is a multiple of the kv heads"
        )
    if doc_ids is not None:
        if doc_ids.shape != (q.shape[0], q.shape[2]) or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"flex_attention: doc_ids must be [B, L] = {(q.shape[0], q.shape[2])} for "
                f"self-attention (L == S), got doc_ids {tuple(doc_ids.shape)} and S = {k.shape[2]}"
            )
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"flex_attention: doc_ids must be integers, got {doc_ids.dtype}")


@torch.library.custom_op("torchgraft::flex_attention", mutates_args=())
def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (within documents when ``doc_ids`` is given); returns ``(out, lse)``."""
    _check_args(q, k, v, doc_ids, enable_gqa)
    with _disable_current_modes(), warnings.catch_warnings():
        block_mask = _block_mask(doc_ids, q.shape[2], k.shape[2], q.device)
        # The unfused path is the intended CPU kernel here (see the module docstring).
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        # The op's own autograd formula differentiates it: flex sees plain tensors.
        out, aux = _flex_attention(
            q.detach(),
            k.detach(),
            v.detach(),
            block_mask=block_mask,
            scale=scale,
            enable_gqa=enable_gqa,
            return_aux=AuxRequest(lse=True),
        )
    return out, aux.lse.float()


@flex_attention.register_fake
def _(q, k, v, doc_ids, scale=None, enable_gqa=False):
    _check_args(q, k, v, doc_ids, enable_gqa)
    batch, heads, q_len, _ = q.shape
    out = q.new_empty((batch, heads, q_len, v.shape[-1]))
    return out, q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("torchgraft::flex_attention_backward", mutates_args=())
def flex_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`flex_attention` given the gradients of ``out`` and ``lse``.

    Per block of query rows, in float32: ``P = exp(q kᵀ·scale − lse)`` on allowed positions
    (0 elsewhere), ``dv += Pᵀ dO``, ``dS = P ∘ (dO vᵀ − rowsum(dO ∘ out) + dlse)``,
    ``dq = dS k·scale``, ``dk += dSᵀ q·scale``.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    k32 = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    v32 = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
    mask_mod = _mask_mod(doc_ids)
    dev = q.device
    b_idx = torch.arange(batch, device=dev).view(batch, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    kv_idx = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len)
    dq = torch.empty(q.shape, dtype=torch.float32, device=dev)
    dk32 = torch.zeros(k32.shape, dtype=torch.float32, device=dev)
    dv32 = torch.zeros(v32.shape, dtype=torch.float32, device=dev)
    for start in range(0, q_len, BACKWARD_BLOCK):
        rows = slice(start, min(start + BACKWARD_BLOCK, q_len))
        q_idx = torch.arange(rows.start, rows.stop, device=dev).view(1, 1, -1, 1)
        allowed = mask_mod(b_idx, h_idx, q_idx, kv_idx)
        q_c = q[:, :, rows].float()
        do_c = grad_out[:, :, rows].float()
        scores = q_c @ k32.transpose(-1, -2) * scale
        probs = torch.exp(scores - lse[:, :, rows, None]).masked_fill(~allowed, 0.0)
        dv32 += probs.transpose(-1, -2) @ do_c
        delta = (do_c * out[:, :, rows].float()).sum(-1, keepdim=True)
        dscores = probs * (do_c @ v32.transpose(-1, -2) - delta + grad_lse[:, :, rows, None])
        dq[:, :, rows] = dscores @ k32 * scale
        dk32 += dscores.transpose(-1, -2) @ q_c * scale
    if group > 1:
        dk32 = dk32.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
        dv32 = dv32.view(batch, kv_heads, group, kv_len, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk32.to(k.dtype), dv32.to(v.dtype)


@flex_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, doc_ids, scale=None, enable_gqa=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc_ids, scale, enable_gqa = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, doc_ids, out, lse)
    ctx.scale, ctx.enable_gqa = scale, enable_gqa


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
    q, k, v, doc_ids, out, lse = ctx.saved_tensors
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.torchgraft.flex_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, doc_ids, ctx.scale, ctx.enable_gqa
    )
    return dq, dk, dv, None, None, None


flex_attention.register_autograd(_backward, setup_context=_setup_context)
