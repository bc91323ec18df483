"""``flex_attention``: causal ``scaled_dot_product_attention`` → ``torchgraft::flex_attention``.

Rewrites causal attention, as models write it, into the FlexAttention op of
:mod:`torchgraft.ops.flex`, with a causal block mask or, with ``mask: document``, a causal
mask restricted to each packed document:

* ``causal_sdpa``: ``aten.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale,
  enable_gqa)`` (``is_causal=True``, no dropout);
* ``masked_sdpa``: the same with an explicit mask tensor and ``is_causal=False``, as
  ``transformers`` models export. The mask must be computed from shapes and constants
  only; it is evaluated at rewrite time (:func:`~torchgraft.handlers.attention_masks.classify_mask`)
  and converted when it is causal, or sliding-window causal (Mistral, Gemma2, Qwen2 with
  ``sliding_window``: the op's ``window``). Masks that depend on data (padding), add a bias
  or are not causal are listed by ``skipped`` with the reason;
* ``eager_attention`` / ``softcapped_attention``: attention written out,
  ``matmul(softmax(q kᵀ · scale [soft-capped] + mask), v)`` (``transformers``' eager
  attention, the only one Gemma2 has), with a mask as above; soft-capping
  ``c · tanh(s / c)`` becomes the op's ``softcap`` (flex's ``score_mod``). Dropout in the
  attention (``p > 0`` while training) is listed by ``skipped``;
* ``*_gqa``: the same after ``transformers``' ``repeat_kv`` (``unsqueeze(kv, 2)`` →
  ``expand`` along the new dim → ``reshape`` to ``H`` heads): the op gets the ``Hkv`` heads
  with ``enable_gqa=True`` instead of the copies.

Example::

    gm = tg.capture(build_llama("debug"), (tokens,))
    tg.PassManager([{"flex_attention": {"mask": "document", "eod_token": 0}}]).run(gm)
    # scaled_dot_product_attention(q, k, v, None, 0.0, True)   becomes
    # eq = aten.eq.Scalar(tokens, 0); to = aten.to.dtype(eq, torch.int64)
    # doc_ids = aten.sub.Tensor(aten.cumsum.default(to, -1), to)
    # torchgraft.flex_attention(q, k, v, doc_ids, None, False)

Document masking needs the token ids, which are not an input of the attention node. The
handler finds them as a graph input (``tokens_input``, or else the one integer input that
feeds an ``aten.embedding`` lookup) and hands it to the replacement as the extra input
``tokens`` (:meth:`FlexAttention.extra_inputs`); the replacement computes the document ids
from it (``document_ids``: the number of
end-of-document tokens before each token, so an EOD token ends its document). Each layer's
replacement computes them again (three ``[B, L]`` integer ops, which the common-subexpression
elimination of ``torch.compile`` merges).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import fx

import torchgraft as tg
from torchgraft.handlers.attention_masks import MaskKind, classify_mask
from torchgraft.handlers.options import OptionError
from torchgraft.ir.rule import Match
from torchgraft.ops.flex import document_ids  # also registers torchgraft::flex_attention

aten = torch.ops.aten

TOKENS = "tokens"
"""Name under which ``mask: document`` binds the token-id graph input in a match."""

WINDOW = "window"
"""Name under which the masked rules bind the sliding window (an int, or None) in a match."""

LAYOUT = "layout"
"""Name under which every rule binds the dims of the matched attention output in memory
order, outermost first (None when it is contiguous): the op's output is laid out the same."""


def _repeated(kv, size, shape):
    # transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]
    return aten.reshape.default(aten.expand.default(aten.unsqueeze.default(kv, 2), size), shape)


def _scores(q, k, scale):
    # q kᵀ · scale, as eager attention writes it
    return aten.mul.Tensor(aten.matmul.default(q, aten.transpose.int(k, 2, 3)), scale)


def _capped(scores, cap):
    # soft-capping: cap * tanh(scores / cap)
    return aten.mul.Tensor(aten.tanh.default(aten.div.Tensor(scores, cap)), cap)


def _attend(scores, mask, v, softmax_dtype, dtype, p, train):
    # matmul(dropout(softmax(scores + mask).to(dtype)), v)
    probs = aten.softmax.int(aten.add.Tensor(scores, mask), -1, softmax_dtype)
    return aten.matmul.default(aten.dropout.default(aten.to.dtype(probs, dtype), p, train), v)


@tg.register_handler("flex_attention")
class FlexAttention(tg.Handler):
    """Causal attention (SDPA or eager) → FlexAttention with a causal, sliding-window or
    document block mask.

    Exact: same outputs and gradients as SDPA up to float rounding. The op's forward runs
    ``torch.compile(flex_attention)`` (flex's fused kernel, also on CPU; compiled once per
    shape and mask kind, a few seconds), its backward a blocked formula of its own (flex has
    none on CPU); see :mod:`torchgraft.ops.flex`.
    """

    @dataclasses.dataclass(kw_only=True)
    class Options:
        mask: Literal["causal", "document"] = "causal"
        """``causal``: the same mask as the SDPA it replaces. ``document``: causal and only
        within a document, documents being delimited by ``eod_token`` in the token ids
        (packed sequences stop attending across document boundaries)."""
        eod_token: int | None = None
        """End-of-document token id; required by ``mask: document``. The EOD token is the
        last token of the document it ends."""
        tokens_input: str | None = None
        """Name of the graph input holding the token ids ``[B, L]`` (``mask: document``).
        Default: the only integer graph input used as the indices of an embedding lookup."""

        def validate(self) -> None:
            if self.mask == "document" and self.eod_token is None:
                raise ValueError("mask 'document' needs the end-of-document id: set eod_token")
            if self.mask == "causal" and (self.eod_token, self.tokens_input) != (None, None):
                raise ValueError("eod_token and tokens_input are only used by mask 'document'")

    def reject(self, match: Match) -> str | None:
        """Why this attention cannot become flex (repeat_kv, dropout, mask, then what
        ``mask: document`` needs), or None."""
        reason = _attention_failure(match)
        if reason is None and self.options.mask == "document":
            reason = self._document_failure(match)
        return reason

    def _document_failure(self, match: Match) -> str | None:
        kind = classify_mask(match.node("mask")) if "mask" in match.bindings else None
        if isinstance(kind, MaskKind) and kind.kind == "sliding_window":
            return f"mask 'document' with a sliding window ({kind.window}) is not supported"
        q, k = match["q"], match["k"]
        if q.shape[2] != k.shape[2]:
            return f"document masking needs self-attention, got L={q.shape[2]}, S={k.shape[2]}"
        tokens = self._token_input(match.anchor.graph)
        shape = tuple(tokens.meta["val"].shape)
        if shape != (q.shape[0], q.shape[2]):
            return (
                f"token input '{tokens.name}' is {list(shape)}, the attention's batch and "
                f"sequence are [{q.shape[0]}, {q.shape[2]}]"
            )
        return None

    def extra_inputs(self, match: Match) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        if "mask" in match.bindings:
            kind = classify_mask(match.node("mask"))
            inputs[WINDOW] = kind.window if isinstance(kind, MaskKind) else None
        if self.options.mask == "document":
            inputs[TOKENS] = self._token_input(match.anchor.graph)
        inputs[LAYOUT] = memory_order(match.outputs[0].meta.get("val"))
        return inputs

    def _token_input(self, graph: fx.Graph) -> fx.Node:
        inputs = [n for n in graph.find_nodes(op="placeholder") if _is_integer(n)]
        name = self.options.tokens_input
        if name is not None:
            found = [n for n in inputs if name in (n.name, n.target)]
            if not found:
                raise OptionError(
                    f"handler 'flex_attention': no integer graph input named {name!r} "
                    f"(integer inputs: {[n.name for n in inputs]})",
                    handler="flex_attention",
                    option="tokens_input",
                )
            return found[0]
        lookups = graph.find_nodes(op="call_function", target=aten.embedding.default)
        found = list(dict.fromkeys(n.args[1] for n in lookups if n.args[1] in inputs))
        if len(found) != 1:
            what = "no integer graph input" if not found else f"{[n.name for n in found]}"
            raise OptionError(
                f"handler 'flex_attention': mask 'document' needs the token ids, but {what} "
                f"feeds an embedding lookup; set tokens_input to one of "
                f"{[n.name for n in inputs]}",
                handler="flex_attention",
                option="tokens_input",
            )
        return found[0]

    # The repeat_kv forms first: they claim the attention before the plain rules would
    # match it with the copied heads.
    @tg.rule
    def causal_sdpa_gqa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ks, kshape, vs, vshape, scale, gqa
    ):
        # sdpa(q, repeat_kv(k), repeat_kv(v), is_causal=True)  =>  flex(q, k, v, enable_gqa)
        return aten.scaled_dot_product_attention.default(
            q, _repeated(k, ks, kshape), _repeated(v, vs, vshape), None, 0.0, True, scale, gqa
        )

    @causal_sdpa_gqa.replacement
    def _(self, q, k, v, ks, kshape, vs, vshape, scale, gqa, **inputs):
        return self.flex(q, k, v, scale, True, inputs)

    @tg.rule
    def masked_sdpa_gqa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ks,
        kshape,
        vs,
        vshape,
        mask: torch.Tensor,
        scale,
        gqa,
    ):
        # sdpa(q, repeat_kv(k), repeat_kv(v), causal_mask)  =>  flex(q, k, v, enable_gqa)
        return aten.scaled_dot_product_attention.default(
            q, _repeated(k, ks, kshape), _repeated(v, vs, vshape), mask, 0.0, False, scale, gqa
        )

    @masked_sdpa_gqa.replacement
    def _(self, q, k, v, ks, kshape, vs, vshape, mask, scale, gqa, **inputs):
        return self.flex(q, k, v, scale, True, inputs)

    @tg.rule
    def causal_sdpa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, enable_gqa: bool
    ):
        # sdpa(q, k, v, is_causal=True)  =>  torchgraft.flex_attention(q, k, v, doc_ids)
        return aten.scaled_dot_product_attention.default(
            q, k, v, None, 0.0, True, scale, enable_gqa
        )

    @causal_sdpa.replacement
    def _(self, q, k, v, scale, enable_gqa, **inputs):
        return self.flex(q, k, v, scale, enable_gqa, inputs)

    @tg.rule
    def masked_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        scale: float | None,
        enable_gqa: bool,
    ):
        # sdpa(q, k, v, causal_mask)  =>  torchgraft.flex_attention(q, k, v, window=...)
        return aten.scaled_dot_product_attention.default(
            q, k, v, mask, 0.0, False, scale, enable_gqa
        )

    @masked_sdpa.replacement
    def _(self, q, k, v, mask, scale, enable_gqa, **inputs):
        return self.flex(q, k, v, scale, enable_gqa, inputs)

    @tg.rule(commutative=(aten.add.Tensor,))
    def eager_attention_gqa(
        q, k, v, ks, kshape, vs, vshape, scale: float, mask: torch.Tensor, sd, dt, p, train
    ):
        # softmax(q repeat_kv(k)ᵀ·scale + mask) repeat_kv(v)  =>  flex(q, k, v, enable_gqa)
        scores = _scores(q, _repeated(k, ks, kshape), scale)
        return _attend(scores, mask, _repeated(v, vs, vshape), sd, dt, p, train)

    @eager_attention_gqa.replacement
    def _(self, q, k, v, ks, kshape, vs, vshape, scale, mask, sd, dt, p, train, **inputs):
        return self.flex(q, k, v, scale, True, inputs)

    @tg.rule(commutative=(aten.add.Tensor,))
    def softcapped_attention_gqa(
        q,
        k,
        v,
        ks,
        kshape,
        vs,
        vshape,
        scale: float,
        cap: float,
        mask: torch.Tensor,
        sd,
        dt,
        p,
        train,
    ):
        # softmax(cap·tanh(q repeat_kv(k)ᵀ·scale / cap) + mask) repeat_kv(v)  =>  flex(softcap)
        scores = _capped(_scores(q, _repeated(k, ks, kshape), scale), cap)
        return _attend(scores, mask, _repeated(v, vs, vshape), sd, dt, p, train)

    @softcapped_attention_gqa.replacement
    def _(self, q, k, v, ks, kshape, vs, vshape, scale, cap, mask, sd, dt, p, train, **inputs):
        return self.flex(q, k, v, scale, True, inputs, cap)

    @tg.rule(commutative=(aten.add.Tensor,))
    def eager_attention(q, k, v, scale: float, mask: torch.Tensor, sd, dt, p, train):
        # softmax(q kᵀ·scale + mask) v  =>  torchgraft.flex_attention(q, k, v)
        return _attend(_scores(q, k, scale), mask, v, sd, dt, p, train)

    @eager_attention.replacement
    def _(self, q, k, v, scale, mask, sd, dt, p, train, **inputs):
        return self.flex(q, k, v, scale, False, inputs)

    @tg.rule(commutative=(aten.add.Tensor,))
    def softcapped_attention(
        q, k, v, scale: float, cap: float, mask: torch.Tensor, sd, dt, p, train
    ):
        # softmax(cap·tanh(q kᵀ·scale / cap) + mask) v  =>  flex_attention(..., softcap=cap)
        return _attend(_capped(_scores(q, k, scale), cap), mask, v, sd, dt, p, train)

    @softcapped_attention.replacement
    def _(self, q, k, v, scale, cap, mask, sd, dt, p, train, **inputs):
        return self.flex(q, k, v, scale, False, inputs, cap)

    def flex(self, q, k, v, scale, enable_gqa, inputs: dict[str, Any], softcap=None):
        """The replacement every rule shares: the op with this handler's mask."""
        doc_ids = None
        # SDPA broadcasts one k, v head over every query head (multi-query attention, e.g.
        # Falcon): for flex that is grouped-query attention with one group.
        enable_gqa = enable_gqa or (k.shape[1] == 1 and q.shape[1] > 1)
        if self.options.mask == "document":
            doc_ids = document_ids(inputs[TOKENS], self.options.eod_token)
        out = torch.ops.torchgraft.flex_attention.default(
            q, k, v, doc_ids, scale, enable_gqa, inputs.get(WINDOW), softcap
        )
        return in_memory_order(out, inputs.get(LAYOUT))


def memory_order(val: Any) -> tuple[int, ...] | None:
    """The dims of tensor ``val`` by decreasing stride (its layout in memory, outermost
    first); None when it is contiguous, or its strides are symbolic. SDPA returns the
    query's layout (``[B, S, H, D]`` in memory for the usual ``view(...).transpose(1, 2)``
    query), and the graph after it may rely on that: JetMoE ``view``s the transposed output,
    which fails on a contiguous ``[B, H, S, D]`` tensor."""
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return None
    strides = val.stride()
    if not all(isinstance(s, int) for s in strides):
        return None
    return tuple(sorted(range(val.dim()), key=lambda d: (-strides[d], d)))


def in_memory_order(out: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """``out`` copied into the layout ``order`` (see :func:`memory_order`), same values."""
    if order is None:
        return out
    inverse = [order.index(d) for d in range(len(order))]
    return out.permute(order).contiguous().permute(inverse)


def _attention_failure(match: Match) -> str | None:
    """Why a structural match is not attention flex computes: ``repeat_kv`` that is not,
    attention dropout, a mask that is neither causal nor sliding-window causal."""
    if match.rule.name.endswith("_gqa"):
        reason = _gqa_failure(match)
        if reason is not None:
            return reason
    if match.bindings.get("train") and match["p"] != 0:
        return (
            f"attention dropout p={match['p']} while training: flex_attention has none; "
            "set the model's attention dropout to 0 (e.g. attention_dropout=0.0)"
        )
    if "mask" in match.bindings:
        kind = classify_mask(match.node("mask"))
        if isinstance(kind, str):
            return kind
    return None


def _gqa_failure(match: Match) -> str | None:
    """Why the ``unsqueeze → expand → reshape`` before the attention is not ``repeat_kv``
    (copies of each kv head next to each other), or None."""
    matched = set(match.nodes.values())

    def user(node: fx.Node) -> fx.Node:
        return next(u for u in node.users if u in matched)

    for name in ("k", "v"):
        expand = user(user(match.node(name)))
        reshape = user(expand)
        kv, rep, out = (n.meta["val"].shape for n in (match.node(name), expand, reshape))
        heads, n_rep = kv[1], rep[2]
        same = tuple(rep) == (kv[0], heads, n_rep, *kv[2:])
        if not same or tuple(out) != (kv[0], heads * n_rep, *kv[2:]):
            return (
                f"{name} is expanded {list(kv)} -> {list(rep)} -> {list(out)}, which is not "
                "repeat_kv (each kv head repeated next to itself)"
            )
    return None


def _is_integer(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return not (val.dtype.is_floating_point or val.is_complex() or val.dtype == torch.bool)
