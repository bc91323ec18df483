"""Choice ops read in topk's form and rebuilt (``ir/choices.py``), and held by the verify
stage's replay (``passes/pinned_choices.py``) for each of them, not only ``topk``."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from torchgraft.ir.choices import chooses_by_index, read_choice, rebuild_outputs
from torchgraft.passes.pinned_choices import RecordChoices, ReplayChoices

aten = torch.ops.aten

CALLS = [
    ("topk", aten.topk.default, (2, 1), {}),
    ("topk smallest", aten.topk.default, (2, -1, False), {}),
    ("max", aten.max.dim, (1,), {}),
    ("max keepdim", aten.max.dim, (-1, True), {}),
    ("min", aten.min.dim, (0,), {}),
    ("argmax", aten.argmax.default, (1,), {}),
    ("argmax keepdim", aten.argmax.default, (), {"dim": -1, "keepdim": True}),
    ("argmax of all", aten.argmax.default, (), {}),
    ("argmax of all keepdim", aten.argmax.default, (), {"keepdim": True}),
    ("argmin", aten.argmin.default, (0,), {}),
]


@pytest.mark.parametrize("name, func, rest, kwargs", CALLS, ids=[c[0] for c in CALLS])
def test_a_choice_rebuilt_from_its_own_indices_is_the_ops_result(name, func, rest, kwargs):
    torch.manual_seed(len(name))
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    out = func(x, *rest, **kwargs)
    chosen = read_choice(func, (x, *rest), kwargs, out)
    assert chosen is not None and chosen.index.dim() == chosen.scores.dim()
    assert torch.equal(chosen.scores.gather(chosen.dim, chosen.index).detach(), _picked(chosen))
    rebuilt = rebuild_outputs(func, (x, *rest), kwargs, x, chosen.index, chosen.dim)
    for mine, theirs in zip(_flat(rebuilt), _flat(out)):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        assert torch.equal(mine.detach(), theirs.detach())
    values = [v for v in _flat(rebuilt) if v.is_floating_point()]
    if values:  # gradients reach the chosen entries, as through the op itself
        (grad,) = torch.autograd.grad(sum(v.sum() for v in values), x)
        (expected,) = torch.autograd.grad(
            sum(v.sum() for v in _flat(out) if v.is_floating_point()), x
        )
        assert torch.equal(grad, expected)


def _picked(chosen) -> torch.Tensor:
    ordered = chosen.scores.detach().sort(chosen.dim, descending=chosen.largest).values
    return ordered.narrow(chosen.dim, 0, chosen.index.shape[chosen.dim])


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def test_not_a_choice():
    x = torch.randn(4)
    assert read_choice(aten.max.default, (x,), {}, x.max()) is None  # no indices
    assert read_choice(aten.argmax.default, (x[0],), {}, x[0].argmax()) is None  # 0-d


@pytest.mark.parametrize("op", ["argmax", "max"])
def test_held_choices_of_argmax_and_max_judge_the_rows_that_would_change(op):
    scores = torch.tensor([[0.50, 0.49, 0.10, 0.00], [0.90, 0.10, 0.05, 0.00]])

    def choose(s: torch.Tensor) -> torch.Tensor:
        return s.argmax(-1) if op == "argmax" else s.max(-1).indices

    with RecordChoices() as recorder:
        choose(scores)
    nudged = scores + torch.tensor([[0.0, 0.02, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with ReplayChoices(recorder.choices) as replay:  # row 0 flips on a near tie
        index = choose(nudged)
    assert index.tolist() == [0, 0]
    assert (replay.changed, replay.unexplained, replay.aligned) == (1, 0, True)
    with ReplayChoices(recorder.choices) as replay:  # the smallest, from the same scores
        index = scores.argmin(-1) if op == "argmax" else scores.min(-1).indices
    assert index.tolist() == [0, 0]  # held; but no movement of the scores explains it
    assert (replay.changed, replay.unexplained, replay.aligned) == (2, 2, True)


def test_masked_out_entries_do_not_make_every_change_explained():
    """Entries masked to -inf in both runs did not move: a flip among the others is judged
    by how far those moved (before, -inf - -inf made the row's movement NaN, and no change
    was ever explained)."""
    inf = float("inf")
    scores = torch.tensor([[0.50, 0.49, -inf, -inf], [0.90, -inf, 0.10, -inf]])
    with RecordChoices() as recorder:
        scores.max(-1)
    with ReplayChoices(recorder.choices) as replay:  # a near tie flips: explained
        scores.add(torch.tensor([0.0, 0.02, 0.0, 0.0])).max(-1)
    assert (replay.changed, replay.unexplained) == (1, 0)
    with ReplayChoices(recorder.choices) as replay:  # the smallest, unmoved: unexplained
        scores.min(-1)
    assert (replay.changed, replay.unexplained) == (2, 2)


def test_only_a_choice_whose_indices_are_used_chooses():
    graph = fx.Graph()
    x = graph.placeholder("x")
    used = graph.call_function(aten.max.dim, (x, -1))
    index = graph.call_function(operator.getitem, (used, 1))
    values_only = graph.call_function(aten.max.dim, (x, -1, True))
    values = graph.call_function(operator.getitem, (values_only, 0))
    argmax = graph.call_function(aten.argmax.default, (x, -1))
    graph.output((index, values, argmax))
    assert chooses_by_index(used) and chooses_by_index(argmax)
    assert not chooses_by_index(values_only)
