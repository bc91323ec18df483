"""Discrete choices held to the original graph's while the verify stage compares runs.

SQNR measures how far a value moved; a choice has no distance. A mixture-of-experts router
picks each token's experts with ``topk``: a rewrite that perturbs the router's input by
rounding noise moves the few tokens near a tie to other experts, and their values then
differ by a whole expert's output. That is how routing responds to any perturbation, not an
error of the rewrite, and it is erratic on the few tokens a check runs (measured on a tiny
Qwen2-MoE with float8: 4-5 of 32 tokens changed experts in its second layer, and the
experts' weight gradient read 9.2 dB; with the choices held, 17.2 dB).

So every graph the verify stage compares with the original takes the original's choices on
the same inputs: each call of a choice op (``topk``, ``max`` / ``min`` along a dim,
``argmax`` / ``argmin``: :mod:`torchgraft.ir.choices`) returns the indices the original's
run chose, and the values at those indices gathered from its own input — gradients flow
through the same entries, and a rewrite that spoils the scores still reads in their values.

Holding a choice must not hide a wrong one, so each row whose own choice differs is judged:
it is *explained* when the scores moved enough to make it, i.e. every entry it chose
instead scored, in the original, within ``2·δ`` of the original's k-th best, where ``δ`` is
how far that row's scores moved (largest absolute change). A rewrite that changes the
choice without moving the scores that much (the wrong experts picked from the right
scores) leaves rows unexplained, which the verify stage reports as ``numerics``.
A run that calls choice ops a different number of times, or with other shapes, is not
pinned (:attr:`ReplayChoices.aligned` is False).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchgraft.ir.choices import Chosen, read_choice, rebuild_outputs

__all__ = ["Chosen", "RecordChoices", "ReplayChoices"]


class RecordChoices(TorchDispatchMode):
    """Records every choice-op call run under it, in call order (topk's form)."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[Chosen] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        chosen = read_choice(func, args, kwargs, out)
        if chosen is not None:
            scores, index = chosen.scores.detach().clone(), chosen.index.detach().clone()
            self.choices.append(Chosen(scores, index, chosen.dim, chosen.largest))
        return out


class ReplayChoices(TorchDispatchMode):
    """Makes the choice-op calls under it return the recorded choices (of
    :class:`RecordChoices`), in call order, with the values gathered at them."""

    def __init__(self, choices: list[Chosen]) -> None:
        super().__init__()
        self.recorded = choices
        self.calls = 0
        self.changed = 0
        """Rows (e.g. tokens) whose own choice differs from the recorded one."""
        self.unexplained = 0
        """Changed rows whose scores moved too little to make that choice."""
        self.mismatched = False

    @property
    def aligned(self) -> bool:
        """Whether every call had a recorded choice of its shape, and none was left over."""
        return not self.mismatched and self.calls == len(self.recorded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        own = read_choice(func, args, kwargs, out)
        if own is None:
            return out
        position = self.calls
        self.calls += 1
        recorded = self.recorded[position] if position < len(self.recorded) else None
        if recorded is None or (recorded.index.shape, recorded.dim) != (own.index.shape, own.dim):
            self.mismatched = True
            return out
        dim, chosen = own.dim, recorded.index.to(own.index.device)
        changed = (own.index.sort(dim).values != chosen.sort(dim).values).any(dim)
        self.changed += int(changed.sum())
        if changed.any():
            explained = _explained(recorded, own.scores, own.index)
            self.unexplained += int((changed & ~explained).sum())
        return rebuild_outputs(func, args, kwargs, own.scores, chosen, dim)


def _explained(recorded: Chosen, scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per row: whether every entry of ``own`` scored, in the original (in its order:
    largest or smallest first), within twice the row's score change of the original's
    worst chosen score."""
    dim, sign = recorded.dim, 1.0 if recorded.largest else -1.0
    before = sign * recorded.scores.to(scores.device, torch.float64)
    after = sign * scores.detach().to(torch.float64)
    # Entries that are infinite in both runs alike (masked out, -inf) did not move.
    moved = torch.where(after == before, 0.0, (after - before).abs()).nan_to_num(math.inf)
    moved = moved.amax(dim)
    worst_chosen = before.gather(dim, recorded.index.to(scores.device)).amin(dim)
    worst_own = before.gather(dim, own).amin(dim)
    rounding = 1e-6 * before.abs().masked_fill(~before.isfinite(), 0.0).amax(dim)
    return worst_chosen - worst_own <= 2 * moved + rounding
