"""What a person looking at a graph wants to know about one node, as plain strings."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from torchgraft.ir.pattern import target_name
from torchgraft.ir.provenance import META_KEY, module_fqn, user_source


def is_op(node: fx.Node) -> bool:
    """A call (of a function, method or module), not an input, attribute or the output."""
    return node.op.startswith("call")


def op_label(node: fx.Node) -> str:
    """The op a node computes: ``aten.linear.default``, ``.view()``, ``get_attr`` ..."""
    if node.op in ("call_function", "call_method"):
        return target_name(node)
    if node.op == "call_module":
        return f"module {node.target}"
    return node.op


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def details(node: fx.Node) -> dict[str, str]:
    """Op, shapes, dtypes, module FQN, user source line and torchgraft provenance, where known."""
    info = {"op": op_label(node)}
    if node.op == "get_attr":
        info["attribute"] = str(node.target)
    tensors = _tensors(node.meta.get("val"))
    if tensors:
        info["shape"] = ", ".join(str(list(t.shape)) for t in tensors)
        info["dtype"] = ", ".join(sorted({_dtype(t) for t in tensors}))
    fqn = module_fqn(node)
    if fqn:
        info["module"] = fqn
    source = user_source(node)
    if source:
        info["source"] = source
    provenance = node.meta.get(META_KEY)
    if provenance:
        info["created by"] = f"{provenance['handler']} / rule {provenance['rule']}"
        info["replaced"] = ", ".join(provenance["replaced"])
    return info


def shape_label(node: fx.Node) -> str:
    """A short ``float32[2, 16, 64]`` label of the node's value (empty if not a tensor)."""
    return ", ".join(f"{_dtype(t)}{list(t.shape)}" for t in _tensors(node.meta.get("val")))
