"""``torchgraft::flex_attention``: causal (optionally sliding-window or document-masked)
attention through ``torch.nn.attention.flex_attention``.

``flex_attention(q, k, v, doc_ids, scale=None, enable_gqa=False, window=None, softcap=None)``
computes ``softmax(cap(q kᵀ · scale) + mask) v`` per head, where ``cap(s) = softcap ·
tanh(s / softcap)`` when ``softcap`` is given (Gemma2's logit soft-capping, flex's
``score_mod``) and the identity otherwise, and the mask lets query ``i`` see
key ``j`` when ``j <= i`` (causal, top-left aligned as in
``scaled_dot_product_attention(is_causal=True)``), if ``window`` is given only when
``i - j < window`` (sliding-window causal, as Mistral and Gemma2 layers use), and, if
``doc_ids [B, L]`` is given, ``doc_ids[b, i] == doc_ids[b, j]`` (document masking: each
packed document attends only to itself; needs ``L == S``). ``q [B, H, L, E]``,
``k [B, Hkv, S, E]``, ``v [B, Hkv, S, Ev]`` → ``out [B, H, L, Ev]`` (contiguous, ``q.dtype``);
``scale`` defaults to ``E ** -0.5``; ``enable_gqa`` lets ``H`` be a multiple of ``Hkv`` (query
head ``h`` reads kv head ``h // (H // Hkv)``), all as in SDPA.

Design, from what torch 2.13 does on CPU:

* **A custom op, not flex in the graph.** ``flex_attention`` takes a ``BlockMask`` built from
  a Python ``mask_mod`` closure, which is not a graph value: a rule's replacement cannot
  build one, and flex's exported form (a higher-order op with sub-graph attributes) cannot
  be spliced by the rewriter. As an op, the mask is described by a tensor (``doc_ids``) and
  rebuilt inside the kernel; the op has fake and autograd implementations, so it survives
  ``torch.export`` and ``torch.compile`` (opaque to both), passes ``torch.library.opcheck``,
  and can get a DTensor sharding rule (heads are independent: shard ``q, k, v, out`` and the
  gradients on dim 1, replicate ``doc_ids``).
* **Forward: compiled flex.** ``torch.compile(flex_attention)`` runs flex's fused CPU kernel
  (scores never materialized). Eager flex is not used: it materializes the scores, is ~7x
  slower than SDPA in steady state, and runs ``vmap`` under a ``torch.compile`` region, which
  fails inside an op called under a Python dispatch mode (``opcheck``'s schema and
  fake-tensor checks: "NYI: querying is_contiguous inside of vmap"). For the same reason the
  ``BlockMask`` is built here without ``vmap`` (:func:`_block_mask`). Cost: one compile of a
  few seconds per distinct (shape, strides, dtype, mask kind, scale), cached by inductor on
  disk; shapes are static (``dynamic=False``: flex's dynamic-shape CPU kernel failed to build
  for some shapes), and each distinct (shape, mask kind, window, soft-cap) is a recompile of
  the one compiled function: the op raises dynamo's ``recompile_limit`` to
  :data:`RECOMPILE_LIMIT` around its call (the default 8 is reached by one process converting
  a few models, and past it dynamo would fall back to eager flex). Inductor's CPU backend
  needs a C++ compiler.
* **Padded and checked.** Inductor generates the CPU kernel for the machine's instruction
  set, and its correctness depends on it: with torch 2.13 on AVX2, causal attention over 8,
  24 or 40 positions came out wrong or NaN (:data:`KV_LENGTH_MULTIPLE` says why; keys and
  values are padded to avoid it). As a guard against faults not yet known, the first call of
  each kernel variant (shapes, strides, dtype, mask kind, scale, window, soft-cap) runs it on
  random inputs of the same layout and compares it with the blocked formula in float64
  (:data:`KERNEL_MIN_SQNR_DB`); a variant that fails is logged once on the ``torchgraft``
  logger and computed by the blocked formula below (float32, exact, slower).
* **Backward: the blocked formula.** Flex has no backward on CPU, eager or compiled
  ("FlexAttention does not support backward on CPU"). ``torchgraft::flex_attention_backward``
  recomputes the masked softmax in blocks of :data:`QUERY_BLOCK` query rows (only keys up
  to the block's last row: every mask here is causal), with the same ``mask_mod``, in
  float32, so it holds ``[B, H, QUERY_BLOCK, S]`` scores at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from .numerics import sqnr

__all__ = [
    "causal_mask",
    "document_ids",
    "document_mask",
    "flex_attention",
    "flex_attention_backward",
    "sliding_window_mask",
    "softcap_score",
]

aten = torch.ops.aten

QUERY_BLOCK = 128
"""Query rows per block of the blocked formula (the backward, and the forward where the
compiled kernel failed its check), which holds ``[B, H, QUERY_BLOCK, S]`` scores."""

_BLOCK_SIZE = 128
"""Sparse block size of the ``BlockMask`` (flex's default)."""

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
    """``mask_mod`` of causal attention: key ``kv_idx`` is visible from query ``q_idx``."""
    return q_idx >= kv_idx


@functools.cache
def sliding_window_mask(window: int) -> MaskMod:
    """``mask_mod`` of sliding-window causal attention: query ``q_idx`` sees the ``window``
    keys ending at itself (``0 <= q_idx - kv_idx < window``). Cached per window, so that
    one compiled kernel serves every layer with that window."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask_mod


@functools.cache
def softcap_score(softcap: float) -> Callable:
    """``score_mod`` of logit soft-capping, ``softcap · tanh(score / softcap)``; cached per
    value, so that one compiled kernel serves every layer."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


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


def _mask_mod(doc_ids: torch.Tensor | None, window: int | None) -> MaskMod:
    if doc_ids is not None:
        return document_mask(doc_ids)
    return causal_mask if window is None else sliding_window_mask(window)


def _block_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device) -> BlockMask:
    """``create_block_mask(mask_mod, batch, None, q_len, kv_len)``, computed without ``vmap``.

    ``create_block_mask`` evaluates ``mask_mod`` under ``torch.vmap``, which fails inside an
    op running under a Python dispatch mode (``torch.library.opcheck``'s schema and fake
    cross-checks: "NYI: querying is_contiguous inside of vmap"). The mask_mods here accept
    broadcastable index tensors, so the dense ``[batch, 1, L, S]`` mask is one call; it is
    reduced to 128 x 128 blocks (all-True blocks "full", mixed ones "partial") exactly as
    ``create_block_mask`` does. The transposed (query-block) indices, used only by flex's own
    backward, are not computed.
    """
    size = _BLOCK_SIZE
    q_blocks, kv_blocks = -(-q_len // size), -(-kv_len // size)
    arange = functools.partial(torch.arange, device=device)
    dense = mask_mod(
        arange(batch).view(-1, 1, 1, 1),
        arange(1).view(1, 1, 1, 1),
        arange(q_len).view(1, 1, -1, 1),
        arange(kv_len).view(1, 1, 1, -1),
    ).expand(batch, 1, q_len, kv_len)
    padded = dense.new_zeros((batch, 1, q_blocks * size, kv_blocks * size))
    padded[:, :, :q_len, :kv_len] = dense
    counts = padded.view(batch, 1, q_blocks, size, kv_blocks, size).sum((3, 5))
    full = counts == size * size
    partial = (counts > 0) & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=False,
    )


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: how many kv blocks are set, and their indices first (int32)."""
    blocks = blocks.to(torch.int32)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


@functools.cache
def _keys_below(mask_mod: MaskMod, kv_len: int) -> MaskMod:
    """``mask_mod`` restricted to the first ``kv_len`` keys (the rest are padding)."""

    def mask_mod_below(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx < kv_len)

    return mask_mod_below


@functools.cache
def _causal_block_mask(
    q_len: int, kv_len: int, padded_kv_len: int, device: torch.device, window: int | None
) -> BlockMask:
    mask_mod = _mask_mod(None, window)
    if q_len > kv_len and padded_kv_len > kv_len:  # causality would show late queries the pad
        mask_mod = _keys_below(mask_mod, kv_len)
    return _block_mask(mask_mod, 1, q_len, padded_kv_len, device)


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    gqa: bool,
    window: int | None = None,
    softcap: float | None = None,
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
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flex_attention: softcap must be > 0, got {softcap}")
    if window is not None and (window < 1 or doc_ids is not None):
        raise ValueError(
            f"flex_attention: window must be >= 1 and cannot be combined with doc_ids, got "
            f"window={window}" + (" with doc_ids" if doc_ids is not None else "")
        )
    if doc_ids is not None:
        if doc_ids.shape != (q.shape[0], q.shape[2]) or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"flex_attention: doc_ids must be [B, L] = {(q.shape[0], q.shape[2])} for "
                f"self-attention (L == S), got doc_ids {tuple(doc_ids.shape)} and S = {k.shape[2]}"
            )
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"flex_attention: doc_ids must be integers, got {doc_ids.dtype}")


@dataclasses.dataclass
class _Block:
    """One block of query rows of the blocked formula, in its compute dtype."""

    rows: slice
    keys: slice  # causal: keys after the block's last row are masked for all of its rows
    scale: float
    q: torch.Tensor  # [B, H, rows, E], times the scale
    k: torch.Tensor  # [B, H, keys, E], kv heads repeated for GQA
    v: torch.Tensor  # [B, H, keys, Ev]
    probs: torch.Tensor  # softmax of the masked (and capped) scores, [B, H, rows, keys]
    capped: torch.Tensor | None  # tanh(s / softcap) when soft-capped


def _attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    scale: float | None,
    window: int | None,
    softcap: float | None,
    dtype: torch.dtype,
    starts: Sequence[int] | None = None,
) -> Iterator[_Block]:
    """The masked softmax of :func:`flex_attention`, :data:`QUERY_BLOCK` query rows at a time
    (the blocks that begin at ``starts``, default all), computed in ``dtype`` with the op's own
    ``mask_mod``."""
    batch, heads, q_len, head_dim = q.shape
    group, kv_len = heads // k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    k_all = k.to(dtype).repeat_interleave(group, dim=1) if group > 1 else k.to(dtype)
    v_all = v.to(dtype).repeat_interleave(group, dim=1) if group > 1 else v.to(dtype)
    mask_mod = _mask_mod(doc_ids, window)
    dev = q.device
    b_idx = torch.arange(batch, device=dev).view(batch, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    kv_idx = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len)
    for start in range(0, q_len, QUERY_BLOCK) if starts is None else starts:
        rows = slice(start, min(start + QUERY_BLOCK, q_len))
        keys = slice(0, min(rows.stop, kv_len))
        q_idx = torch.arange(start, rows.stop, device=dev).view(1, 1, -1, 1)
        allowed = mask_mod(b_idx, h_idx, q_idx, kv_idx[..., keys])
        q_c = q[:, :, rows].to(dtype) * scale
        k_c, v_c = k_all[:, :, keys], v_all[:, :, keys]
        scores = q_c @ k_c.transpose(-1, -2)
        capped = None
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            scores = capped * softcap
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        yield _Block(rows, keys, scale, q_c, k_c, v_c, probs, capped)


def _blocked_attention(q, k, v, doc_ids, scale, window, softcap, dtype) -> torch.Tensor:
    """:func:`flex_attention`'s output by the blocked formula, in ``dtype``."""
    out = q.new_empty((*q.shape[:3], v.shape[-1]), dtype=dtype)
    for block in _attention_blocks(q, k, v, doc_ids, scale, window, softcap, dtype):
        out[:, :, block.rows] = block.probs @ block.v
    return out


RECOMPILE_LIMIT = 64
"""Compiled variants of flex the op keeps (dynamo's ``recompile_limit`` during its call)."""


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Built on first use: importing torch.compile's machinery takes seconds.
    return torch.compile(_flex_attention, dynamic=False)


KERNEL_MIN_SQNR_DB = {torch.float64: 80.0, torch.float32: 80.0}
"""SQNR (dB) the compiled kernel must reach against the float64 formula in its check; other
dtypes (bfloat16, float16) need :data:`HALF_KERNEL_MIN_SQNR_DB`. A right kernel reaches
~135 dB in float32; the faulty one (AVX2, unpadded keys) gave 12-24 dB or NaN."""

HALF_KERNEL_MIN_SQNR_DB = 30.0

_kernel_verdicts: dict[tuple, bool] = {}
_log = logging.getLogger("torchgraft")


KV_LENGTH_MULTIPLE = 16
"""The compiled kernel sees keys and values padded to a multiple of this many positions.

Inductor's CPU flex kernel (torch 2.13) computes ``q kᵀ`` with a micro-GEMM blocked by 16
columns (``GemmBlocking(1, 16, 1)``). On a partial block of ``N`` keys where ``N`` is a
multiple of the CPU's float vector width but less than 16 (8 on AVX2, 4 or 8 or 12 with
128-bit vectors; never with AVX-512's 16), its transposed-B tail kernel still reads and
writes all 16 columns: it reads past the keys and overwrites the row's running maximum, so
the output is wrong or NaN, depending on what lies in memory. Every block of a padded
length is a multiple of 16. The padded keys are masked (causality hides them from every
query when ``L <= S``, :func:`_keys_below` otherwise)."""


def _compiled_kernel(q, k, v, doc_ids, scale, window, softcap) -> torch.Tensor:
    """Compiled flex on keys and values padded to :data:`KV_LENGTH_MULTIPLE`."""
    q_len, kv_len = q.shape[2], k.shape[2]
    pad = -kv_len % KV_LENGTH_MULTIPLE
    if pad:
        k, v = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
        if doc_ids is not None:  # never read for a real query: L == S and masks are causal
            doc_ids = F.pad(doc_ids, (0, pad), value=-1)
    if doc_ids is None:
        block_mask = _causal_block_mask(q_len, kv_len, kv_len + pad, q.device, window)
    else:
        block_mask = _block_mask(document_mask(doc_ids), q.shape[0], q_len, kv_len + pad, q.device)
    # The scale is made explicit and GQA always on (a no-op when H == Hkv) so that one
    # compiled kernel serves every call of a given shape and mask kind.
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled_flex_attention()(
            q,
            k,
            v,
            block_mask=block_mask,
            score_mod=None if softcap is None else softcap_score(softcap),
            scale=q.shape[-1] ** -0.5 if scale is None else scale,
            enable_gqa=True,
        )


def _compiled_kernel_is_right(q, k, v, doc_ids, scale, window, softcap) -> bool:
    """Whether the compiled kernel for these inputs' shapes, layouts and mask kind computes
    the formula: once per variant, on random inputs laid out like these, against the blocked
    formula in float64 (the first and last batch entries' first and last blocks of
    :data:`QUERY_BLOCK` query rows). A variant that fails is logged once and runs the
    blocked formula.

    Inductor generates the CPU kernel for the machine's instruction set, and its
    correctness has depended on it (:data:`KV_LENGTH_MULTIPLE` avoids the fault found); this
    check keeps a fault not yet known from reaching the user's numbers.
    """
    variant = (
        *((tuple(t.shape), t.stride()) for t in (q, k, v)),
        q.dtype,
        q.device,
        doc_ids is None,
        scale,
        window,
        softcap,
    )
    verdict = _kernel_verdicts.get(variant)
    if verdict is None:
        generator = torch.Generator(q.device).manual_seed(0)
        q_r, k_r, v_r = (torch.empty_like(t).normal_(generator=generator) for t in (q, k, v))
        out = _compiled_kernel(q_r, k_r, v_r, doc_ids, scale, window, softcap)
        # The reference is computed for the first and last batch entries' first and last
        # blocks of query rows only, which bounds its memory by that of one backward block.
        batches = sorted({0, q.shape[0] - 1})
        starts = sorted({0, (q.shape[2] - 1) // QUERY_BLOCK * QUERY_BLOCK})
        picked = [None if t is None else t[batches] for t in (q_r, k_r, v_r, doc_ids)]
        blocks = list(
            _attention_blocks(*picked, scale, window, softcap, torch.float64, starts=starts)
        )
        quality = sqnr(
            torch.cat([out[batches][:, :, block.rows] for block in blocks], dim=2),
            torch.cat([block.probs @ block.v for block in blocks], dim=2),
        )
        verdict = quality >= KERNEL_MIN_SQNR_DB.get(q.dtype, HALF_KERNEL_MIN_SQNR_DB)
        _kernel_verdicts[variant] = verdict
        if not verdict:
            _log.warning(
                "torchgraft::flex_attention: the compiled flex kernel for q %s, k %s, v %s "
                "(%s, %s mask) is wrong on this CPU (%.1f dB against the formula); these "
                "shapes run the blocked formula instead (%d query rows at a time, slower)",
                tuple(q.shape),
                tuple(k.shape),
                tuple(v.shape),
                q.dtype,
                _mask_kind(doc_ids, window),
                quality,
                QUERY_BLOCK,
            )
    return verdict


def _mask_kind(doc_ids: torch.Tensor | None, window: int | None) -> str:
    if doc_ids is not None:
        return "document"
    return "causal" if window is None else f"sliding-window {window}"


@torch.library.custom_op("torchgraft::flex_attention", mutates_args=())
def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention, within documents when ``doc_ids`` is given, over the last
    ``window`` keys when ``window`` is given, with soft-capped scores when ``softcap`` is."""
    _check_args(q, k, v, doc_ids, enable_gqa, window, softcap)
    # The op's own autograd formula differentiates it, so flex sees plain tensors.
    q, k, v = q.detach(), k.detach(), v.detach()
    if _compiled_kernel_is_right(q, k, v, doc_ids, scale, window, softcap):
        out = _compiled_kernel(q, k, v, doc_ids, scale, window, softcap)
    else:
        out = _blocked_attention(q, k, v, doc_ids, scale, window, softcap, torch.float32)
    return out.to(q.dtype).contiguous()  # the layout the fake implementation promises


@flex_attention.register_fake
def _(q, k, v, doc_ids, scale=None, enable_gqa=False, window=None, softcap=None):
    _check_args(q, k, v, doc_ids, enable_gqa, window, softcap)
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("torchgraft::flex_attention_backward", mutates_args=())
def flex_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`flex_attention` given the gradient of its output.

    Per block of query rows, in float32: ``P = softmax(q kᵀ·scale)`` over the allowed keys
    (0 elsewhere), ``dP = dO vᵀ``, ``dS = P ∘ (dP − rowsum(P ∘ dP))``; ``dq = dS k·scale``,
    ``dk += dSᵀ q·scale``, ``dv += Pᵀ dO``. With ``softcap``, ``P`` is the softmax of the
    capped scores ``c · tanh(s / c)`` and ``dS`` is multiplied by their derivative
    ``1 − tanh²(s / c)``.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk32 = torch.zeros((batch, heads, kv_len, head_dim), dtype=torch.float32, device=q.device)
    dv32 = torch.zeros((batch, heads, kv_len, v.shape[-1]), dtype=torch.float32, device=q.device)
    for block in _attention_blocks(q, k, v, doc_ids, scale, window, softcap, torch.float32):
        rows, keys, probs = block.rows, block.keys, block.probs
        do_c = grad_out[:, :, rows].float()
        dv32[:, :, keys] += probs.transpose(-1, -2) @ do_c
        dscores = do_c @ block.v.transpose(-1, -2)  # dP, then dS = P * (dP - rowsum(P * dP))
        delta = (probs * dscores).sum(-1, keepdim=True)
        dscores.sub_(delta).mul_(probs)
        if block.capped is not None:
            dscores.mul_(1 - block.capped * block.capped)
        dq[:, :, rows] = (dscores @ block.k) * block.scale
        dk32[:, :, keys] += dscores.transpose(-1, -2) @ block.q
    if group > 1:
        dk32 = dk32.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
        dv32 = dv32.view(batch, kv_heads, group, kv_len, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk32.to(k.dtype).contiguous(), dv32.to(v.dtype).contiguous()


@flex_attention_backward.register_fake
def _(grad_out, q, k, v, doc_ids, scale=None, enable_gqa=False, window=None, softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc_ids, scale, enable_gqa, window, softcap = inputs
    ctx.save_for_backward(q, k, v, doc_ids)
    ctx.scale, ctx.enable_gqa, ctx.window, ctx.softcap = scale, enable_gqa, window, softcap


def _backward(ctx, grad_out: torch.Tensor):
    q, k, v, doc_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.torchgraft.flex_attention_backward(
        grad_out, q, k, v, doc_ids, ctx.scale, ctx.enable_gqa, ctx.window, ctx.softcap
    )
    return dq, dk, dv, None, None, None, None, None


flex_attention.register_autograd(_backward, setup_context=_setup_context)
