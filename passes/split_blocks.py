"""Outline each transformer block of a captured graph into its own submodule.

An exported graph's root ``forward`` runs every op itself and never calls its submodules, so
FSDP2, which gathers a module's parameters around that module's call, could only shard the
root: every parameter would be gathered for the whole step. After :func:`split_blocks` the
root calls one ``GraphModule`` per block (``layers.0``, ``layers.1`` ...), installed at the
block's FQN and owning the block's parameters under their original names, so parameter FQNs
(and checkpoints) are unchanged and ``fully_shard(block)`` gathers a block's parameters
only around its own compute.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence

from torch import fx

from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.provenance import module_fqn

__all__ = ["BLOCK_PATTERN", "SplitError", "split_blocks"]

BLOCK_PATTERN = r"layers\.\d+"
"""A block is a module whose FQN ends with this pattern (``model.layers.3``)."""


class SplitError(TorchgraftError):
    """A block's nodes cannot be outlined (not contiguous in the graph)."""


def _block_of(fqn: str, pattern: re.Pattern[str]) -> str | None:
    """The shortest prefix of ``fqn`` that names a block, or None."""
    match = pattern.match(fqn)
    return match.group(1) if match else None


def _block_nodes(gm: fx.GraphModule, pattern: str) -> dict[str, list[fx.Node]]:
    """Each block's nodes in graph order: the ops traced in it and the parameters and
    buffers under its FQN."""
    regex = re.compile(rf"^((?:.*?\.)?{pattern})(?:\.|$)")
    blocks: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            block = _block_of(node.target, regex)
        elif node.op in ("call_function", "call_method", "call_module"):
            block = _block_of(module_fqn(node), regex)
        else:
            block = None
        if block is not None:
            blocks.setdefault(block, []).append(node)
    return blocks


def _outline(gm: fx.GraphModule, block: str, nodes: Sequence[fx.Node]) -> None:
    """Replace ``nodes`` (one block) by a call of a new ``GraphModule`` installed at ``block``."""
    inside = set(nodes)
    compute = [n for n in nodes if n.op != "get_attr"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first, last = order[compute[0]], order[compute[-1]]
    strays = [n for n in gm.graph.nodes if first < order[n] < last and n not in inside]
    if strays:
        raise SplitError(
            f"block {block!r}: nodes {[n.name for n in strays[:3]]} from outside it sit between "
            "its ops, so it cannot be outlined as one call"
        )
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in compute if any(u not in inside for u in n.users)]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        env[value] = graph.placeholder(value.name)
        env[value].meta.update(value.meta)
    prefix = block + "."
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "get_attr":
            env[node].target = node.target[len(prefix) :]
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    container = gm.get_submodule(block)
    submodule = fx.GraphModule(container, graph, class_name="Block")
    lost = {n for n, _ in container.named_parameters()} - {
        n for n, _ in submodule.named_parameters()
    }
    if lost:
        raise SplitError(f"block {block!r}: parameters {sorted(lost)} are not used by its ops")

    parent, _, name = block.rpartition(".")
    setattr(gm.get_submodule(parent), name, submodule)
    with gm.graph.inserting_before(compute[0]):
        call = gm.graph.call_module(block, tuple(inputs))
        results = (
            [call]
            if len(outputs) == 1
            else [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
        )
    for old, new in zip(outputs, results):
        new.meta.update(val=old.meta.get("val"))
        old.replace_all_uses_with(new)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def split_blocks(gm: fx.GraphModule, pattern: str = BLOCK_PATTERN) -> list[str]:
    """Outline every block (module FQN ending in ``pattern``) into a submodule at its FQN;
    returns the blocks' FQNs in graph order (``[]`` if the graph has none).

    The new submodules share the graph's parameter objects. Raises :class:`SplitError`
    if a block's ops are interleaved with other nodes.
    """
    blocks = _block_nodes(gm, pattern)
    for block, nodes in blocks.items():
        _outline(gm, block, nodes)
    gm.graph.lint()
    gm.recompile()
    return list(blocks)
