"""The parallelize stage: tensor parallelism and FSDP2 on a converted graph, ranks from
``torchrun``.

Example (on each rank, launched with ``torchrun --nproc_per_node 2 train.py``)::

    gm = tg.capture(build_llama("tiny", with_loss=True), (tokens, labels))
    tg.PassManager(["float8"]).run(gm)
    gm = parallelize(gm, {"tp": 2})          # default plan: LLAMA_PLAN
    loss = gm(tokens, labels)                # same global batch and loss on every rank
    loss.backward()

The result takes and returns what the single-process graph does (see
:mod:`torchgraft.passes.graph_io`), so it trains with :func:`torchgraft.train.train`
unchanged. Order: tensor parallelism (:mod:`~torchgraft.passes.tensor_parallel`), then the
input/output conversions, then FSDP2 (:mod:`~torchgraft.passes.fsdp`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchgraft.ir.errors import TorchgraftError
from torchgraft.passes.fsdp import apply_fsdp
from torchgraft.passes.graph_io import convert_inputs_outputs
from torchgraft.passes.liveness import Heartbeat, unresponsive_ranks
from torchgraft.passes.tensor_parallel import LLAMA_PLAN, apply_tensor_parallel

__all__ = [
    "DEFAULT_INIT_TIMEOUT_S",
    "DEFAULT_TRAIN_TIMEOUT_S",
    "ParallelSpec",
    "build_mesh",
    "collective_failure",
    "init_distributed",
    "leave_distributed",
    "parallelize",
    "set_collective_timeout",
]

DEFAULT_INIT_TIMEOUT_S = 300.0
"""Seconds a collective may wait while the job starts (joining, sharding, the first step,
which includes compiling): a rank that does not answer ends the job after this long."""
DEFAULT_TRAIN_TIMEOUT_S = 100.0
"""Seconds a collective may wait once training runs (after the first applied step)."""


class ParallelSpec(Protocol):
    """The ``parallel`` section of a run config (:class:`torchgraft.config.ParallelConfig`).

    ``tp``: tensor-parallel degree (1: none). ``fsdp``: ``False``, ``True`` (every rank not
    used by ``tp`` is a data-parallel rank) or the data-parallel degree. ``plan``: module FQN
    glob → ``"colwise"`` | ``"rowwise"`` | ``"replicate"``; empty means
    :data:`~torchgraft.passes.tensor_parallel.LLAMA_PLAN`. An optional
    ``sequence_parallel`` (default ``True``) keeps activations between the tensor-parallel
    regions sharded along the tokens. Optional ``init_timeout_s`` (default
    :data:`DEFAULT_INIT_TIMEOUT_S`) bounds every collective until the first training step.
    """

    tp: int
    fsdp: bool | int
    plan: Mapping[str, str]


def init_distributed(device_type: str = "cpu", timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> None:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` ...), unless one exists: ``gloo`` on CPU, ``nccl`` on CUDA. A collective
    that waits longer than ``timeout_s`` for another rank raises instead of hanging, and a
    rank of this host that stops responding for that long is ended
    (:mod:`~torchgraft.passes.liveness`)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise TorchgraftError(
            "parallelize needs a process group: launch with torchrun (RANK and WORLD_SIZE are "
            "unset), e.g. torchrun --nproc_per_node 2 -m torchgraft run CONFIG"
        )
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    global _joined, _heartbeat
    _joined = True
    _heartbeat = Heartbeat.for_torchrun(timeout_s)


_joined = False
"""Whether :func:`init_distributed` joined the default process group (a user's own is left
alone)."""
_heartbeat: Heartbeat | None = None
"""This rank's heartbeat while :func:`init_distributed`'s group stands."""


def leave_distributed() -> None:
    """Destroy the process group :func:`init_distributed` joined, if any, while the
    interpreter is still whole: left to interpreter exit, gloo's worker threads can abort
    the process (pytorch/pytorch#179291)."""
    global _joined, _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def set_collective_timeout(timeout_s: float) -> None:
    """Change the timeout of every process group of this process (the default group and
    the device mesh's), and how long a rank of this host may stop responding, to
    ``timeout_s``, e.g. once the first training step is done."""
    groups = list(dist.distributed_c10d._world.pg_map)  # every group this rank belongs to
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
    if _heartbeat is not None:
        _heartbeat.set_timeout(timeout_s)


_LOST_PEER_SIGNS = ("timed out", "connection reset by peer", "connection closed by peer")
"""What gloo's errors say when another rank hung or died (gloo raises plain RuntimeErrors)."""


def collective_failure(exc: BaseException) -> str | None:
    """A one-line account of ``exc`` if it is a collective that failed or timed out under a
    process group, else ``None``: it names this rank and the ranks whose heartbeat stopped
    (:func:`~torchgraft.passes.liveness.unresponsive_ranks`)."""
    if not dist.is_initialized() or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    ended_a_rank = _heartbeat is not None and bool(_heartbeat.ended)
    lost_peer = any(sign in text.lower() for sign in _LOST_PEER_SIGNS)
    if not (isinstance(exc, dist.DistError) or lost_peer or ended_a_rank):
        return None
    world = dist.get_world_size()
    stopped = [place.describe(world) for place in unresponsive_ranks()]
    culprit = (
        f"{', '.join(stopped)} stopped responding"
        if stopped
        else "every rank still responds, so one is not reaching the collective (a deadlock "
        "or a far slower step)"
    )
    return (
        f"rank {dist.get_rank()} of {world}: a collective failed or timed out waiting for "
        f"the other ranks: {culprit}: {text}"
    )


def data_parallel_degree(tp: int, fsdp: bool | int, world: int) -> int:
    """Number of data-parallel (FSDP) ranks: ``fsdp`` itself when it is a degree, all ranks
    not used by tensor parallelism when it is ``True``, 1 when FSDP is off."""
    if not fsdp:
        return 1
    return world // tp if fsdp is True else int(fsdp)


def build_mesh(tp: int, fsdp: bool | int, device_type: str = "cpu") -> DeviceMesh:
    """The device mesh over all ranks: ``("tp",)``, ``("fsdp",)`` or ``("fsdp", "tp")``."""
    world = dist.get_world_size()
    dp = data_parallel_degree(tp, fsdp, world)
    if tp < 1 or dp < 1 or tp * dp != world:
        raise TorchgraftError(
            f"parallel: tp={tp} x fsdp={dp} data-parallel ranks must use all {world} ranks"
        )
    if fsdp and tp > 1:
        return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("fsdp", "tp"))
    name = "fsdp" if fsdp else "tp"
    return init_device_mesh(device_type, (world,), mesh_dim_names=(name,))


def _option(config: ParallelSpec | Mapping[str, Any], key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def parallelize(
    gm: fx.GraphModule,
    config: ParallelSpec | Mapping[str, Any],
    mesh: DeviceMesh | None = None,
) -> fx.GraphModule:
    """Apply tensor parallelism and/or FSDP2 to ``gm`` in place and return it.

    ``config`` is a :class:`ParallelSpec` or a mapping with the same keys. Without ``mesh``,
    the process group is joined (:func:`init_distributed`) and the mesh built from the config
    (:func:`build_mesh`) on the device of ``gm``'s parameters. A given ``mesh`` decides by its
    dim names: ``"tp"`` for tensor parallelism, ``"fsdp"`` for FSDP2 (e.g. a 2 x 1
    ``("fsdp", "tp")`` mesh).

    Under FSDP every rank computes its share of the global batch, and an exported graph's
    shapes are baked in: capture ``gm`` with ``batch // dp`` rows (``dp``: the size of the
    ``"fsdp"`` mesh dim), or with a symbolic batch dim (``dynamic_shapes``; then any global
    batch that splits evenly over the ranks). The result takes the global batch (see
    :mod:`~torchgraft.passes.graph_io`).

    ``gm``'s parameters are replaced by DTensors (same FQNs); the model it was captured from
    keeps its own.
    """
    if mesh is None:
        device_type = next(gm.parameters()).device.type
        init_distributed(device_type, _option(config, "init_timeout_s", DEFAULT_INIT_TIMEOUT_S))
        mesh = build_mesh(_option(config, "tp", 1), _option(config, "fsdp", False), device_type)
    names = mesh.mesh_dim_names or ()
    tp_mesh = mesh["tp"] if "tp" in names else None
    dp_mesh = mesh["fsdp"] if "fsdp" in names else None
    if tp_mesh is not None:
        plan = dict(_option(config, "plan", None) or LLAMA_PLAN)
        sequence_parallel = _option(config, "sequence_parallel", True)
        apply_tensor_parallel(gm, tp_mesh, plan, sequence_parallel=sequence_parallel)
    convert_inputs_outputs(gm, tp_mesh=tp_mesh, dp_mesh=dp_mesh)
    if dp_mesh is not None:
        apply_fsdp(gm, dp_mesh)
    return gm
