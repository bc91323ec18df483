"""Read an attention mask off the graph: is it computed from shapes only, and which mask is it?

``transformers`` models under ``torch.export`` pass ``scaled_dot_product_attention`` an
explicit mask tensor built from ``arange`` / comparisons / ``expand`` of the sequence
length, not ``is_causal=True``. :func:`classify_mask` decides what that mask is by
evaluating its subgraph at rewrite time (the sizes it reads are the example's, and with
symbolic sizes also twice those) and comparing the result with the causal and
sliding-window causal masks. A mask that depends on input data (a padding
``attention_mask``) or on a parameter cannot be known at rewrite time: the reason says so.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import Any, Literal

import torch
from torch import fx
from torch.fx.node import map_arg

__all__ = ["MaskKind", "classify_mask"]

aten = torch.ops.aten

_SIZE_OPS = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})
"""Ops that read only the shape of their input: a mask computed through them depends on
sizes, not data."""


@dataclasses.dataclass(frozen=True)
class MaskKind:
    """What an attention mask is, as ``flex_attention`` can express it."""

    kind: Literal["causal", "sliding_window"]
    window: int | None = None
    """``sliding_window``: query ``i`` sees keys ``i - window < j <= i``."""


_CLASSIFIED: weakref.WeakKeyDictionary[fx.Node, MaskKind | str] = weakref.WeakKeyDictionary()
"""Kinds already computed: every layer of a model usually shares one mask node, and the
handler's filter, its extra inputs and ``skipped`` all ask (an evaluation of a
``[2, 1, 1024, 1024]`` mask costs ~0.25 s)."""


def classify_mask(mask: fx.Node) -> MaskKind | str:
    """The kind of the attention mask computed by ``mask``, or why it is none of them."""
    if mask not in _CLASSIFIED:
        _CLASSIFIED[mask] = _classify(mask)
    return _CLASSIFIED[mask]


def _classify(mask: fx.Node) -> MaskKind | str:
    order, inputs = _subgraph(mask)
    if inputs:
        node = inputs[0]
        what = "graph input" if node.op == "placeholder" else "parameter"
        return (
            f"the mask depends on the {what} '{node.target}' (data, e.g. a padding "
            "attention_mask), not only on shapes; flex_attention converts masks computed from "
            "shapes: call the model without a padding mask (pack sequences and use "
            "mask: document) or leave this attention as SDPA"
        )
    symbols = _symbols(order)
    kinds = []
    for scale in (1, 2) if symbols else (1,):
        sizes = {s: scale * hint for s, hint in symbols.items()}
        try:
            dense = _evaluate(order, sizes)
        except Exception as exc:  # an op that cannot run outside the model
            return f"the mask could not be evaluated at rewrite time: {type(exc).__name__}: {exc}"
        kind = _kind(dense)
        if isinstance(kind, str):
            return kind
        kinds.append((kind, dense.shape[-2]))
    return _consistent(kinds)


def _subgraph(mask: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The mask's ancestors in topological order, and the data inputs among them
    (placeholders and parameters reached other than through a size op)."""
    root = mask.graph.owning_module
    order: list[fx.Node] = []
    inputs: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack: list[tuple[fx.Node, bool]] = [(mask, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder" or (
            node.op == "get_attr" and isinstance(_attr(root, node), torch.nn.Parameter)
        ):
            inputs.append(node)
            continue
        stack.append((node, True))
        if node.op == "call_function" and node.target in _SIZE_OPS:
            continue  # reads a shape: its input's data is not needed
        stack.extend((n, False) for n in reversed(node.all_input_nodes) if n not in seen)
    return order, inputs


def _attr(root: Any, node: fx.Node) -> Any:
    return operator.attrgetter(node.target)(root) if root is not None else None


def _symbols(order: list[fx.Node]) -> dict[Any, int]:
    """Free symbols of the sizes the mask reads, with their example values."""
    symbols: dict[Any, int] = {}
    for node in order:
        val = node.meta.get("val")
        if (
            node.op == "call_function"
            and node.target in _SIZE_OPS
            and isinstance(val, torch.SymInt)
        ):
            env = val.node.shape_env
            for symbol in val.node.expr.free_symbols:
                symbols[symbol] = int(env.var_to_val[symbol])
    return symbols


def _evaluate(order: list[fx.Node], sizes: dict[Any, int]) -> torch.Tensor:
    root = order[-1].graph.owning_module
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in order:
            if node.op == "get_attr":
                env[node] = _attr(root, node)
            elif node.target in _SIZE_OPS:
                val = node.meta["val"]
                env[node] = (
                    int(val.node.expr.xreplace(sizes)) if isinstance(val, torch.SymInt) else val
                )
            elif node.op == "call_function":
                args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = node.target(*args, **kwargs)
            else:
                raise ValueError(f"node '{node.name}' is a {node.op}")
    return env[order[-1]]


def _kind(mask: torch.Tensor) -> MaskKind | str:
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            return (
                "the mask adds a bias (values other than 0 and -inf, e.g. ALiBi or relative "
                "positions): flex_attention converts masks that only allow or block keys"
            )
    else:
        return f"the mask is a {mask.dtype} tensor, expected bool or float"
    length, keys = allowed.shape[-2:]
    rows = allowed.reshape(-1, length, keys)
    if not (rows == rows[:1]).all():
        return "the mask differs between batch rows or heads (e.g. padding)"
    allowed = rows[0]
    if length != keys:
        return (
            f"the mask is [L, S] = [{length}, {keys}] (cross-attention or a KV cache); "
            "flex_attention converts self-attention masks"
        )
    distance = torch.arange(length).view(-1, 1) - torch.arange(keys).view(1, -1)
    causal = distance >= 0
    if torch.equal(allowed, causal):
        return MaskKind("causal")
    if not (allowed & ~causal).any():
        window = int(allowed.sum(-1).max())
        if torch.equal(allowed, causal & (distance < window)):
            return MaskKind("sliding_window", window)
    if allowed.all():
        return (
            "the mask allows every key (bidirectional attention); flex_attention converts "
            "causal and sliding-window causal masks"
        )
    return "the mask is neither causal nor sliding-window causal"


def _consistent(kinds: list[tuple[MaskKind, int]]) -> MaskKind | str:
    """One kind for every evaluated size: a window wider than the shorter sequence looks
    causal there and is the sliding window of the longer one."""
    (first, length), *rest = kinds
    for kind, _ in rest:
        if kind == first:
            continue
        if first.kind == "causal" and kind.kind == "sliding_window" and kind.window >= length:
            first = kind
            continue
        return f"the mask changes kind with the sequence length ({first} and {kind})"
    return first
