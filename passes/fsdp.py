"""FSDP2 on a captured graph: one ``fully_shard`` group per transformer block, the root last."""

from __future__ import annotations

from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from torchgraft.passes.split_blocks import BLOCK_PATTERN, split_blocks

__all__ = ["apply_fsdp"]


def apply_fsdp(
    gm: fx.GraphModule, mesh: DeviceMesh, block_pattern: str = BLOCK_PATTERN
) -> list[str]:
    """Shard ``gm``'s parameters over the 1-D data-parallel ``mesh``; returns the blocks
    sharded as their own groups.

    The graph is split per block (:func:`~torchgraft.passes.split_blocks.split_blocks`) and
    each block gets ``fully_shard``, so its parameters are gathered only around its own
    forward and backward; ``fully_shard(gm)`` then groups the rest (embeddings, final norm,
    output), and is the only group of a graph without blocks. Parameters that are already
    DTensors on a tensor-parallel mesh are sharded on top of it (2-D parallelism); ``mesh``
    and that mesh must then come from one 2-D mesh.
    """
    blocks = split_blocks(gm, block_pattern)
    for block in blocks:
        fully_shard(gm.get_submodule(block), mesh=mesh)
    fully_shard(gm, mesh=mesh)
    return blocks
