"""``chunked_cross_entropy``: output projection + cross-entropy → a chunked computation.

The rules match the loss at the end of a captured language model, from the output
projection's ``aten.linear(h, w)`` through the flattening of the logits to
``aten.cross_entropy_loss``, and replace the whole chain by
``torchgraft::chunked_linear_cross_entropy`` (:mod:`torchgraft.ops.chunked_ce`), which never
holds more than ``[chunk_size, vocab]`` logits in forward or backward::

    gm = tg.capture(build_llama("debug", with_loss=True), (tokens, labels))
    tg.PassManager([{"chunked_cross_entropy": {"chunk_size": 1024}}]).run(gm)
    # linear -> flatten -> cross_entropy_loss   becomes
    # chunked_linear_cross_entropy(h, output.weight, labels, 1024, -100, "mean", None)

Matched chains (one rule each; the logits must have no other user, e.g. a model that
also returns its logits keeps them and does not match):

* ``flatten_ce``: ``linear → flatten(0, -2) → cross_entropy_loss`` (``logits.flatten(0, 1)``);
* ``view_ce`` / ``reshape_ce``: ``linear → view|reshape([-1, V]) → cross_entropy_loss``;
* ``linear_ce``: 2-D hidden states, ``linear → cross_entropy_loss``;
* ``transformers_ce``: ``transformers``' causal-LM loss as exported:
  ``linear → to(float32) → view([-1, V]) → cross_entropy_loss``;
* ``softcap_flatten_ce`` / ``softcap_transformers_ce``: the first and the last with the
  logits soft-capped after the projection, ``cap * tanh(logits / cap)`` (Gemma2's
  ``final_logit_softcapping``), which the op then applies per chunk (``softcap=cap``).

Only ``weight=None``, ``label_smoothing=0`` and integer class-index labels are rewritten;
``reduction`` may be mean, sum or none and ``ignore_index`` anything.
The handler runs before the linear-layer conversions (``float8``, ``int8``, ``mx``,
``bitnet``) when they are in the same plan: they would otherwise turn the output projection
into their own op and this loss would no longer match (and, the two patterns overlapping,
the plan would be ambiguous).
"""

from __future__ import annotations

import dataclasses
import math

import torch

import torchgraft as tg
import torchgraft.ops.chunked_ce  # noqa: F401  (registers torchgraft::chunked_linear_cross_entropy)
from torchgraft.ir.rule import Match

aten = torch.ops.aten

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
"""``aten.cross_entropy_loss``'s ``reduction`` enum."""


def _cross_entropy(logits, labels, reduction, ignore_index):
    return aten.cross_entropy_loss.default(logits, labels, None, reduction, ignore_index, 0.0)


def _softcap(logits, cap):
    """Logit soft-capping as models write it: ``tanh(logits / cap) * cap``."""
    return aten.mul.Tensor(aten.tanh.default(aten.div.Tensor(logits, cap)), cap)


@tg.register_handler("chunked_cross_entropy")
class ChunkedCrossEntropy(tg.Handler):
    """Fuses the output projection and the cross-entropy into a row-chunked op.

    Same loss and gradients as the unchunked graph (float32 softmax statistics); peak
    memory of the loss drops from ``O(tokens × vocab)`` to ``O(chunk_size × vocab)``; the
    backward recomputes the logits, one extra ``tokens × dim × vocab`` GEMM
    (see ``benchmarks/chunked_ce_memory.py``).
    """

    before = ("float8", "int8", "mx", "bitnet")

    @dataclasses.dataclass(kw_only=True)
    class Options:
        chunk_size: int = 1024
        """Rows (tokens) per chunk: the op holds ``chunk_size × vocab`` float32 logits at a
        time. Smaller saves memory, larger runs bigger GEMMs."""

        def validate(self) -> None:
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def reject(self, match: Match) -> str | None:
        h, w, labels = match["h"], match["w"], match["labels"]
        logits = match.anchor.args[0].meta.get("val")
        if match["reduction"] not in _REDUCTIONS:
            return f"reduction {match['reduction']!r} is not one of {_REDUCTIONS}"
        if h.dtype != w.dtype:
            return f"hidden states are {h.dtype} and the weight {w.dtype}"
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            return f"labels are {labels.dtype}, not class indices (probability targets)"
        rows = math.prod(h.shape[:-1])
        if logits is None or tuple(logits.shape) != (rows, w.shape[0]):
            shape = None if logits is None else tuple(logits.shape)
            return (
                f"the cross-entropy's input {shape} is not the projection's logits with their "
                f"{rows} rows flattened ([{rows}, {w.shape[0]}])"
            )
        if tuple(labels.shape) != (rows,):
            return f"labels {tuple(labels.shape)} are not one class index per row ({rows},)"
        return None

    def chunked(
        self, h, w, labels, reduction: int, ignore_index: int, out_dtype=None, softcap=None
    ):
        """The replacement every rule shares (``softcap`` passed only when set)."""
        args = (h, w, labels, self.options.chunk_size, ignore_index, _REDUCTIONS[reduction])
        capped = () if softcap is None else (softcap,)
        return torch.ops.torchgraft.chunked_linear_cross_entropy.default(*args, out_dtype, *capped)

    @tg.rule
    def flatten_ce(h, w, labels, start: int, end: int, reduction: int, ignore_index: int):
        # linear -> flatten -> cross_entropy  =>  chunked_linear_cross_entropy
        logits = aten.flatten.using_ints(aten.linear.default(h, w), start, end)
        return _cross_entropy(logits, labels, reduction, ignore_index)

    @flatten_ce.replacement
    def _(self, h, w, labels, start, end, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index)

    @tg.rule
    def view_ce(h, w, labels, shape, reduction: int, ignore_index: int):
        # linear -> view([-1, V]) -> cross_entropy  =>  chunked_linear_cross_entropy
        logits = aten.view.default(aten.linear.default(h, w), shape)
        return _cross_entropy(logits, labels, reduction, ignore_index)

    @view_ce.replacement
    def _(self, h, w, labels, shape, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index)

    @tg.rule
    def reshape_ce(h, w, labels, shape, reduction: int, ignore_index: int):
        # linear -> reshape([-1, V]) -> cross_entropy  =>  chunked_linear_cross_entropy
        logits = aten.reshape.default(aten.linear.default(h, w), shape)
        return _cross_entropy(logits, labels, reduction, ignore_index)

    @reshape_ce.replacement
    def _(self, h, w, labels, shape, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index)

    @tg.rule
    def linear_ce(h, w, labels, reduction: int, ignore_index: int):
        # linear (2-D) -> cross_entropy  =>  chunked_linear_cross_entropy
        return _cross_entropy(aten.linear.default(h, w), labels, reduction, ignore_index)

    @linear_ce.replacement
    def _(self, h, w, labels, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index)

    @tg.rule
    def transformers_ce(h, w, labels, to_dtype, shape, reduction: int, ignore_index: int):
        # transformers' ForCausalLMLoss: linear -> to(float32) -> view -> cross_entropy
        # (export's metadata check on the logits goes away with them)
        flat = aten.view.default(aten.to.dtype(aten.linear.default(h, w), to_dtype), shape)
        return _cross_entropy(flat, labels, reduction, ignore_index)

    @transformers_ce.replacement
    def _(self, h, w, labels, to_dtype, shape, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index, to_dtype)

    @tg.rule
    def softcap_flatten_ce(
        h, w, labels, cap: float, start: int, end: int, reduction: int, ignore_index: int
    ):
        # linear -> soft-cap -> flatten -> cross_entropy  =>  chunked(..., softcap=cap)
        logits = aten.flatten.using_ints(_softcap(aten.linear.default(h, w), cap), start, end)
        return _cross_entropy(logits, labels, reduction, ignore_index)

    @softcap_flatten_ce.replacement
    def _(self, h, w, labels, cap, start, end, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index, softcap=float(cap))

    @tg.rule
    def softcap_transformers_ce(
        h, w, labels, cap: float, to_dtype, shape, reduction: int, ignore_index: int
    ):
        # transformers' loss of soft-capped logits: linear -> soft-cap -> to -> view -> CE
        capped = _softcap(aten.linear.default(h, w), cap)
        flat = aten.view.default(aten.to.dtype(capped, to_dtype), shape)
        return _cross_entropy(flat, labels, reduction, ignore_index)

    @softcap_transformers_ce.replacement
    def _(self, h, w, labels, cap, to_dtype, shape, reduction, ignore_index):
        return self.chunked(h, w, labels, reduction, ignore_index, to_dtype, float(cap))
