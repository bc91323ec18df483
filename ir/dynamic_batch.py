"""The batch dimension of a captured graph: asked for as dynamic, and whether it is.

``torch.export`` bakes every size into the graph unless told otherwise; a training graph
captured with one example batch would refuse the last partial batch or an eval batch of
another size. :func:`batch_dynamic_shapes` asks for dim 0 of every tensor input as
``Dim.AUTO``: dynamic where the model allows it, specialized (without an error) where its
code fixes the size. :func:`has_dynamic_batch` says which of the two the graph got.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["batch_dynamic_shapes", "has_dynamic_batch"]


def batch_dynamic_shapes(args: Sequence[Any]) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_shapes`` for :func:`torchgraft.capture` of ``args``: dim 0 of each tensor
    with at least one dim is ``Dim.AUTO``, every other argument is static."""
    return tuple(
        {0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.ndim >= 1 else None for a in args
    )


def has_dynamic_batch(gm: fx.GraphModule) -> bool:
    """Whether dim 0 of every tensor input of ``gm`` is symbolic (and there is one); a
    size export specialized is a ``SymInt`` with a constant value, which does not count."""
    batch = [
        n.meta["val"].shape[0]
        for n in gm.graph.find_nodes(op="placeholder")
        if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].ndim >= 1
    ]
    return bool(batch) and not any(is_concrete_int(size) for size in batch)
