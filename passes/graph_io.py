"""The parallelized graph's inputs and outputs: it takes and returns what the single-process
graph does, so training loops, checkpoints and numerics checks use it unchanged.

Every rank calls it with the same global batch. Inside, the graph

* keeps only its own rows of each input under data parallelism (``BatchShard``): an even
  share of any global batch when the graph's batch dimension is symbolic (captured with
  ``dynamic_shapes``), else exactly the rows it was captured with (an exported graph has
  its shapes baked in, so it must have been captured with one rank's share of the batch,
  ``batch // dp`` rows); ``torch.export``'s input guards then check those rows;
* makes its inputs, and the tensors it creates from no tensor input, replicated DTensors on
  the tensor-parallel mesh (``ReplicateInput``);
* turns DTensor outputs back into full tensors (``FullOutput``) and combines the
  data-parallel ranks' outputs (``BatchCombine``): a 0-dim floating output is averaged (it
  is taken to be a batch-mean loss: with equal rows per rank the average is the global
  mean, and its gradient reaches each rank's local loss with weight 1, which FSDP's
  gradient averaging then turns into the global mean's gradient); other outputs are
  concatenated along dim 0.

Each conversion is a small parameter-free module called from the graph (``tg_*``).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

__all__ = [
    "BatchCombine",
    "BatchShard",
    "FullOutput",
    "ReplicateInput",
    "convert_inputs_outputs",
    "is_number",
]

_GUARDS = "_guards_fn"
"""``torch.export``'s input-shape check: it must see the inputs as exported."""


class ReplicateInput(nn.Module):
    """A tensor that is identical on every rank, as a replicated DTensor on ``mesh``."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> DTensor:
        return DTensor.from_local(x, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)


class FullOutput(nn.Module):
    """A DTensor output as the full tensor (replicated, then local); others unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.full_tensor() if isinstance(x, DTensor) else x


class BatchShard(nn.Module):
    """This data-parallel rank's contiguous share of the rows (dim 0) of a global batch."""

    def __init__(self, mesh: DeviceMesh, rows: int | None) -> None:
        super().__init__()
        self.mesh = mesh
        self.rows = rows
        """Rows per rank: the batch size the graph was captured with, or ``None`` for a
        symbolic batch dimension (any global batch that splits evenly over the ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ranks = self.mesh.size()
        rows = x.shape[0] // ranks if self.rows is None else self.rows
        if self.rows is None and x.shape[0] % ranks:
            raise ValueError(
                f"a global batch of {x.shape[0]} rows does not split evenly over {ranks} "
                "data-parallel ranks (each rank's loss is weighted equally)"
            )
        if x.shape[0] != rows * ranks:
            raise ValueError(
                f"the graph was captured with {rows} rows per data-parallel rank, so with "
                f"{ranks} ranks it takes a global batch of {rows * ranks} rows, not {x.shape[0]}"
            )
        start = rows * self.mesh.get_local_rank()
        return x[start : start + rows]


class BatchCombine(nn.Module):
    """The data-parallel ranks' outputs as the global batch's (see the module docstring)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 and x.is_floating_point():
            return funcol.all_reduce(x, "sum", self.mesh) / self.mesh.size()
        return funcol.all_gather_single_autograd(x, gather_dim=0, group=self.mesh)


def _insert_after(
    gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, *, guards: bool = False
) -> fx.Node:
    """Call ``module`` on ``node`` right after it and route ``node``'s other users to it
    (the input guards too if ``guards``)."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    new.meta.update(val=node.meta.get("val"), nn_module_stack=node.meta.get("nn_module_stack", {}))
    node.replace_all_uses_with(
        new, delete_user_cb=lambda user: user is not new and (guards or user.target != _GUARDS)
    )
    return new


def _created_tensors(gm: fx.GraphModule) -> list[fx.Node]:
    """Tensors the graph makes from no tensor input (``arange``, ``zeros`` ...; with a
    symbolic batch their sizes may come from ``sym_size`` nodes, which are no tensors)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.meta.get("val"), torch.Tensor)
        and all(is_number(a) for a in n.all_input_nodes)
    ]


_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def is_number(node: fx.Node) -> bool:
    """Whether ``node`` computes a number, not a tensor: a size (``sym_size`` of a
    symbolic batch dim) or arithmetic on sizes."""
    return isinstance(node.meta.get("val"), _NUMBERS)


def convert_inputs_outputs(
    gm: fx.GraphModule, *, tp_mesh: DeviceMesh | None, dp_mesh: DeviceMesh | None
) -> None:
    """Insert the conversions of the module docstring for the given meshes (1-D each)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if dp_mesh is not None:
            rows = node.meta["val"].shape[0]
            shard = BatchShard(dp_mesh, rows=rows if isinstance(rows, int) else None)
            node = _insert_after(gm, node, f"tg_batch_shard_{node.name}", shard, guards=True)
        if tp_mesh is not None:
            _insert_after(gm, node, f"tg_replicate_{node.name}", ReplicateInput(tp_mesh))
    if tp_mesh is not None:
        for node in _created_tensors(gm):
            _insert_after(gm, node, f"tg_replicate_{node.name}", ReplicateInput(tp_mesh))
    (output,) = gm.graph.find_nodes(op="output")
    for i, node in enumerate(output.all_input_nodes):
        if tp_mesh is not None:
            node = _wrap_output(gm, output, node, f"tg_full_output_{i}", FullOutput())
        if dp_mesh is not None:
            _wrap_output(gm, output, node, f"tg_batch_combine_{i}", BatchCombine(dp_mesh))
    gm.graph.lint()
    gm.recompile()


def _wrap_output(
    gm: fx.GraphModule, output: fx.Node, node: fx.Node, name: str, module: nn.Module
) -> fx.Node:
    """Route the graph output ``node`` through ``module``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(output):
        new = gm.graph.call_module(name, (node,))
    new.meta.update(val=node.meta.get("val"))
    output.replace_input_with(node, new)
    return new
