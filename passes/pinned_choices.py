"""Discrete choices held to the original graph's while the verify stage compares runs.

SQNR measures how far a value moved; a choice has no distance. A mixture-of-experts router
picks each token's experts with ``topk``: a rewrite that perturbs the router's input by
rounding noise moves the few tokens near a tie to other experts, and their values then
differ by a whole expert's output. That is how routing responds to any perturbation, not an
error of the rewrite, and it is erratic on the few tokens a check runs (measured on a tiny
Qwen2-MoE with float8: 4-5 of 32 tokens changed experts in its second layer, and the
experts' weight gradient read 9.2 dB; with the choices held, 17.2 dB).

So every graph the verify stage compares with the original takes the original's choices on
the same inputs: each ``aten.topk`` returns the indices the original's run chose, and the
values at those indices gathered from its own input — gradients flow through the same
entries, and a rewrite that spoils the scores still reads in their values.

Holding a choice must not hide a wrong one, so each row whose own choice differs is judged:
it is *explained* when the scores moved enough to make it, i.e. every entry it chose
instead scored, in the original, within ``2·δ`` of the original's k-th best, where ``δ`` is
how far that row's scores moved (largest absolute change). A rewrite that changes the
choice without moving the scores that much (the wrong experts picked from the right
scores) leaves rows unexplained, which the verify stage reports as ``numerics``.
A run that calls ``topk`` a different number of times, or with other shapes, is not pinned
(:attr:`ReplayChoices.aligned` is False).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Choice", "RecordChoices", "ReplayChoices"]

_TOPK = torch.ops.aten.topk.default


@dataclasses.dataclass(frozen=True)
class Choice:
    """One ``topk`` call of the original run: its scores, what it chose, along which dim,
    and whether the largest or the smallest."""

    scores: torch.Tensor
    index: torch.Tensor
    dim: int
    largest: bool


class RecordChoices(TorchDispatchMode):
    """Records every ``aten.topk`` run under it, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[Choice] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _TOPK:
            dim = _argument(args, kwargs, 2, "dim", -1)
            largest = _argument(args, kwargs, 3, "largest", True)
            scores, index = args[0].detach().clone(), out[1].detach().clone()
            self.choices.append(Choice(scores, index, dim, largest))
        return out


class ReplayChoices(TorchDispatchMode):
    """Makes the ``aten.topk`` calls under it return the recorded choices (of
    :class:`RecordChoices`), in call order, with the values gathered at them."""

    def __init__(self, choices: list[Choice]) -> None:
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
        if func is not _TOPK:
            return out
        index = self.calls
        self.calls += 1
        if index >= len(self.recorded) or self.recorded[index].index.shape != out[1].shape:
            self.mismatched = True
            return out
        recorded = self.recorded[index]
        dim, chosen = recorded.dim, recorded.index.to(out[1].device)
        changed = (out[1].sort(dim).values != chosen.sort(dim).values).any(dim)
        self.changed += int(changed.sum())
        if changed.any():
            explained = _explained(recorded, args[0], out[1])
            self.unexplained += int((changed & ~explained).sum())
        return args[0].gather(dim, chosen), chosen


def _explained(recorded: Choice, scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per row: whether every entry of ``own`` scored, in the original (in its order:
    largest or smallest first), within twice the row's score change of the original's
    worst chosen score."""
    dim, sign = recorded.dim, 1.0 if recorded.largest else -1.0
    before = sign * recorded.scores.to(scores.device, torch.float64)
    after = sign * scores.detach().to(torch.float64)
    moved = (after - before).abs().amax(dim)
    worst_chosen = before.gather(dim, recorded.index.to(scores.device)).amin(dim)
    worst_own = before.gather(dim, own).amin(dim)
    rounding = 1e-6 * before.abs().amax(dim)
    return worst_chosen - worst_own <= 2 * moved + rounding


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)
