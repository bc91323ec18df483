"""Discrete choices: the aten ops that pick entries of a tensor by comparing them.

``topk``, ``max`` / ``min`` along a dim (values and indices) and ``argmax`` / ``argmin`` all
choose, per row along a dim, the k largest or smallest entries (k = 1 but for ``topk``).
A mixture-of-experts router chooses each token's experts with one of them (Mixtral and
Qwen2-MoE with ``topk``, Switch Transformers with ``argmax``, PhiMoE's sparse mixer with
``max``). This module reads any such call in one form, topk's: the scores, the dim, largest
or smallest, and the chosen indices with that dim kept (size k); and rebuilds the op's own
outputs from chosen indices, which is how a run is made to take another run's choices
(:mod:`~torchgraft.passes.pinned_choices`).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["CHOICE_OPS", "Chosen", "chooses_by_index", "read_choice", "rebuild_outputs"]

_LARGEST = {
    aten.topk.default: None,  # from its `largest` argument
    aten.max.dim: True,
    aten.min.dim: False,
    aten.argmax.default: True,
    aten.argmin.default: False,
}

CHOICE_OPS = frozenset(_LARGEST)
"""The aten overloads that choose entries (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class Chosen:
    """One call of a choice op in topk's form."""

    scores: torch.Tensor
    """What was compared (the input; flattened when the op chose over all its entries)."""
    index: torch.Tensor
    """The chosen entries' indices into ``scores`` along ``dim``, that dim kept."""
    dim: int
    largest: bool


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _dim_and_keepdim(func: Any, args: tuple, kwargs: dict) -> tuple[int | None, bool]:
    if func is aten.topk.default:
        return _argument(args, kwargs, 2, "dim", -1), True
    default = None if func in (aten.argmax.default, aten.argmin.default) else 0
    return _argument(args, kwargs, 1, "dim", default), _argument(args, kwargs, 2, "keepdim", False)


def read_choice(func: Any, args: tuple, kwargs: dict, out: Any) -> Chosen | None:
    """The call ``func(*args, **kwargs) -> out`` in topk's form; None when ``func`` is not a
    choice op or chose from a 0-d tensor (nothing to choose)."""
    if func not in _LARGEST or args[0].dim() == 0:
        return None
    scores = args[0]
    largest = _LARGEST[func]
    if largest is None:
        largest = _argument(args, kwargs, 3, "largest", True)
    index = out[1] if isinstance(out, tuple) else out
    dim, keepdim = _dim_and_keepdim(func, args, kwargs)
    if dim is None:  # argmax / argmin over all entries
        return Chosen(scores.reshape(-1), index.reshape(1), 0, largest)
    dim %= scores.dim()
    return Chosen(scores, index if keepdim else index.unsqueeze(dim), dim, largest)


def rebuild_outputs(
    func: Any, args: tuple, kwargs: dict, scores: torch.Tensor, index: torch.Tensor, dim: int
) -> Any:
    """What ``func(*args, **kwargs)`` returns had it chosen ``index`` (topk's form, along
    ``dim`` of ``scores``, as :func:`read_choice` gives them): the values are gathered from
    ``scores``, so gradients flow to the chosen entries."""
    if func in (aten.argmax.default, aten.argmin.default):
        chosen_dim, keepdim = _dim_and_keepdim(func, args, kwargs)
        if chosen_dim is None:
            return index.reshape([1] * args[0].dim() if keepdim else [])
        return index if keepdim else index.squeeze(dim)
    values = scores.gather(dim, index)
    if func is aten.topk.default or _dim_and_keepdim(func, args, kwargs)[1]:
        return values, index
    return values.squeeze(dim), index.squeeze(dim)


def chooses_by_index(node: fx.Node) -> bool:
    """Whether graph node ``node`` calls a choice op whose indices the graph uses (``max``
    along a dim taken only for its values, as a numerically stable softmax does, chooses
    nothing)."""
    if node.op != "call_function" or node.target not in CHOICE_OPS:
        return False
    if node.target in (aten.argmax.default, aten.argmin.default):
        return True
    return any(
        user.op == "call_function"
        and user.target is operator.getitem
        and user.args[1] == 1
        and user.users
        for user in node.users
    )
