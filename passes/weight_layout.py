"""Which dim of a linear layer's weight holds its output features, read from the graph.

``nn.Linear`` stores its weight ``[out, in]``; ``transformers``' GPT-2 ``Conv1D`` stores it
``[in, out]`` and exports as ``aten.addmm(bias, x, W)``; ``x @ self.w`` is ``[in, out]`` and
``x @ self.w.t()`` is ``[out, in]``. Tensor parallelism must shard a column-parallel weight
on its output features and a row-parallel one on its input features, whatever the layout:
:func:`output_feature_dims` follows each 2-D parameter through transposes and casts to the
matmul-like ops that consume it, whose argument layouts are known (:data:`_CONSUMERS`,
and every ``torchgraft::*_linear`` op, laid out like ``F.linear``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from torchgraft.ir.errors import TorchgraftError
from torchgraft.ops.linear import linear_ops

__all__ = ["LayoutError", "output_feature_dims"]

aten = torch.ops.aten

_CONSUMERS: dict[torch._ops.OpOverload, tuple[int, int]] = {
    aten.linear.default: (1, 0),  # linear(x, W[out, in], b)
    aten.addmm.default: (2, 1),  # addmm(b, x, W[in, out])
    aten.mm.default: (1, 1),  # mm(x, W[in, out])
    aten.matmul.default: (1, 1),  # matmul(x, W[in, out])
}
"""Op → (argument holding the weight, dim of that argument that holds the output features)."""

_CASTS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.alias.default})
"""Ops that keep a weight's layout."""


class LayoutError(TorchgraftError):
    """A parameter is used as a linear weight in two layouts that disagree."""


def _flips(node: fx.Node) -> bool | None:
    """Whether ``node`` transposes its 2-D input (``True``), keeps its layout (``False``),
    or is neither (``None``)."""
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    if node.target in _CASTS:
        return False
    return None


def _output_dim(node: fx.Node, value: fx.Node) -> int | None:
    """The dim of ``value`` holding the output features if ``node`` consumes it as a matmul
    weight, else ``None``."""
    layout = (1, 0) if node.target in linear_ops() else _CONSUMERS.get(node.target)
    if layout is None or len(node.args) <= layout[0] or node.args[layout[0]] is not value:
        return None
    return layout[1]


def _uses(param: fx.Node) -> set[int]:
    """Output-features dims of the weight ``param`` in every matmul that consumes it."""
    dims: set[int] = set()
    work = [(param, False)]
    while work:
        value, flipped = work.pop()
        for user in value.users:
            if user.op != "call_function":
                continue
            dim = _output_dim(user, value)
            if dim is not None:
                dims.add(dim ^ flipped)
                continue
            flips = _flips(user) if user.args and user.args[0] is value else None
            if flips is not None:
                work.append((user, flipped ^ flips))
    return dims


def output_feature_dims(gm: fx.GraphModule) -> dict[str, int]:
    """FQN of each 2-D parameter that some matmul-like op of ``gm`` uses as its weight →
    the dim (0 or 1) that holds the output features. Parameters used otherwise are absent.

    Raises :class:`LayoutError` if one parameter is used in two layouts that disagree (no
    single sharding serves both)."""
    dims: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        try:
            value = operator.attrgetter(node.target)(gm)
        except AttributeError:
            continue
        if not isinstance(value, nn.Parameter) or value.ndim != 2:
            continue
        uses = _uses(node)
        if len(uses) > 1:
            raise LayoutError(
                f"parameter {node.target} is used as a matmul weight both [out, in] and "
                "[in, out]; tensor parallelism cannot shard it for both"
            )
        if uses:
            dims[node.target] = uses.pop()
    return dims
