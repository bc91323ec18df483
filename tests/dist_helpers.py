"""Multi-process tests on CPU: a harness that runs a worker on 2 gloo ranks, and the workers.

Workers are module-level functions ``worker(rank, world_size, *args)`` (spawned processes
import them by name); each rank's return value comes back to the test. A worker that hangs
(a collective one rank never joins) is killed after ``timeout_s`` and the test fails.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import fx
from torch.distributed.device_mesh import init_device_mesh

import torchgraft as tg
from torchgraft.config import parse_config
from torchgraft.ir.dynamic_batch import batch_dynamic_shapes
from torchgraft.models import build_llama
from torchgraft.models.hf import build_causal_lm
from torchgraft.ops import sqnr
from torchgraft.ops.sharding import gather_float8, scatter_float8_grad
from torchgraft.passes.parallelize import parallelize
from torchgraft.train import TrainConfig, train
from torchgraft.train.job import run_job
from torchgraft.train.lm import NextTokenLoss

WORLD_SIZE = 2
BATCH, SEQ_LEN, STEPS = 4, 16, 10


def run_ranks(worker: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``worker(rank, WORLD_SIZE, *args)`` on ``WORLD_SIZE`` processes joined in a gloo
    process group; return each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(port, out, timeout_s, worker, args), nprocs=WORLD_SIZE, join=True)
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _entry(
    rank: int, port: int, out: str, timeout_s: float, worker: Callable[..., Any], args: tuple
) -> None:
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(worker(rank, WORLD_SIZE, *args), Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The result is on disk: leave without interpreter finalization, where gloo's worker
    # threads can still hold tensors and abort the process (seen once in CI as SIGABRT,
    # "terminate called without an active exception"; pytorch/pytorch#179291).
    os._exit(0)


# --- models and data ------------------------------------------------------------------------


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` seeded ``(tokens, labels)`` batches of ``[BATCH, SEQ_LEN]``."""
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (BATCH, SEQ_LEN), generator=g)
        data.append((tokens, torch.randint(0, 256, (BATCH, SEQ_LEN), generator=g)))
    return data


def converted_llama(handlers: Sequence[Any], rows: int = BATCH, *, with_loss: bool = False):
    """The tiny Llama (logits, or its loss), captured with ``rows`` rows and converted."""
    tokens = torch.zeros(rows, SEQ_LEN, dtype=torch.long)
    args = (tokens, tokens) if with_loss else (tokens,)
    gm = tg.capture(build_llama("tiny", with_loss=with_loss), args)
    if handlers:
        tg.PassManager(list(handlers)).run(gm)
    return gm


GPT2 = dict(
    vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
)
"""A tiny transformers GPT-2: its projections are ``Conv1D`` (weight ``[in, out]``,
exported as ``aten.addmm``)."""
GPT2_PLAN = {
    "h.*.attn.c_attn": "colwise",
    "h.*.attn.c_proj": "rowwise",
    "h.*.mlp.c_fc": "colwise",
    "h.*.mlp.c_proj": "rowwise",
}


def gpt2_graph() -> fx.GraphModule:
    """The tiny GPT-2 with its next-token loss (dropout off), captured with a dynamic batch."""
    tokens = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    config = {**GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = NextTokenLoss(build_causal_lm("gpt2", **config))
    return tg.capture(model, (tokens, tokens), dynamic_shapes=batch_dynamic_shapes([tokens] * 2))


def seeded_step(module: torch.nn.Module, rows: int) -> torch.Tensor:
    """Forward and backward of ``module(tokens, labels)`` on a seeded batch of ``rows``
    rows; returns the loss."""
    g = torch.Generator().manual_seed(rows)
    tokens, labels = (torch.randint(0, 256, (rows, SEQ_LEN), generator=g) for _ in range(2))
    loss = module(tokens, labels)
    loss.backward()
    return loss.detach()


def take_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (the full tensor of a DTensor's), cleared after."""
    grads = {}
    for name, p in module.named_parameters():
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        p.grad = None
    return grads


def loss_and_grads(module: torch.nn.Module, rows: int) -> tuple[torch.Tensor, dict]:
    """:func:`seeded_step`'s loss and :func:`take_grads`."""
    loss = seeded_step(module, rows)
    return loss, take_grads(module)


def train_logits(
    gm: fx.GraphModule, data: Sequence[tuple[torch.Tensor, torch.Tensor]], micro_batches: int = 1
):
    """AdamW steps (the library's default LR) on ``gm``, which returns logits; each step's
    loss and logits. With ``micro_batches``, each batch is split along its rows and the
    gradients accumulated: what data parallelism over that many ranks computes (``gm``
    captured with the rows of one micro-batch)."""
    optimizer = torch.optim.AdamW(gm.parameters(), lr=3e-4)
    losses, logits = [], []
    for tokens, labels in data:
        loss, outs = 0.0, []
        for t, y in zip(tokens.chunk(micro_batches), labels.chunk(micro_batches)):
            out = gm(t)
            part = F.cross_entropy(out.flatten(0, 1), y.flatten()) / micro_batches
            part.backward()
            loss += part.item()
            outs.append(out.detach())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss)
        logits.append(torch.cat(outs))
    return losses, logits


# --- workers ----------------------------------------------------------------------------------


def train_scenarios(rank: int, world: int, scenarios: Sequence[tuple[str, dict, list]]):
    """For each ``(name, mesh {dim name: size}, handlers)``: the converted tiny Llama,
    captured with this rank's share of the batch, parallelized on that mesh and trained for
    ``STEPS`` steps. Returns ``{name: (losses, logits, float8 collectives)}``, the last
    the number of :func:`gather_float8` and :func:`scatter_float8_grad` calls in the graph."""
    data = batches()
    results = {}
    for name, dims, handlers in scenarios:
        mesh = init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))
        rows = BATCH // dims.get("fsdp", 1)
        gm = parallelize(converted_llama(handlers, rows=rows), {}, mesh)
        float8_collectives = sum(
            len(m.graph.find_nodes(op="call_function", target=target))
            for m in gm.modules()
            if isinstance(m, fx.GraphModule)
            for target in (gather_float8, scatter_float8_grad)
        )
        results[name] = (*train_logits(gm, data), float8_collectives)
    return results


def quantized_linears(rank: int, world: int, cases: Sequence[tuple[str, tuple]]):
    """Each ``torchgraft::<op>(x, w, None, *config)`` with ``w`` sharded colwise and
    rowwise: the worst SQNR (dB) of output, ``dX`` and ``dW`` against the unsharded op."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 64, generator=g), torch.randn(128, 64, generator=g)
    grad = torch.randn(2, 16, 128, generator=g)
    results = {}
    for op_name, config in cases:
        op = getattr(torch.ops.torchgraft, op_name)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = op(xr, wr, None, *config)
        ref.backward(grad)
        for style, (x_p, w_p, g_p) in {
            "colwise": (Replicate(), Shard(0), Shard(2)),
            "rowwise": (Shard(2), Shard(1), Replicate()),
        }.items():
            xd = distribute_tensor(x, mesh, [x_p]).requires_grad_()
            wd = distribute_tensor(w, mesh, [w_p]).requires_grad_()
            y = op(xd, wd, None, *config)
            y.backward(distribute_tensor(grad, mesh, [g_p]))
            results[op_name, config, style] = min(
                sqnr(y.full_tensor(), ref.detach()),
                sqnr(xd.grad.full_tensor(), xr.grad),
                sqnr(wd.grad.full_tensor(), wr.grad),
            )
    return results


def handler_steps(rank: int, world: int, handler_specs: Sequence[Any]):
    """Each handler alone on the tiny Llama with its loss, tensor-parallel over all ranks:
    the loss and gradients of one step (full tensors)."""
    tokens, labels = batches(1)[0]
    results = {}
    for spec in handler_specs:
        gm = parallelize(converted_llama([spec], with_loss=True), {"tp": world})
        loss = gm(tokens, labels)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in gm.named_parameters()}
        results[str(spec)] = (loss.detach(), grads)
    return results


def resume_config(checkpoint_dir: str | Path | None, steps: int) -> TrainConfig:
    """Resume from ``checkpoint_dir`` (if it has a checkpoint) and train up to ``steps``,
    saving every 2 steps. The learning rate is constant, so runs with different ``steps``
    follow one trajectory."""
    return TrainConfig(
        steps=steps,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        warmup_steps=0,
        min_lr_ratio=1.0,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        resume=checkpoint_dir is not None,
        progress=False,
    )


def resume_parallel(rank: int, world: int, checkpoint_dir: str, steps: int, parallel: dict):
    """Resume the loss-in-graph tiny Llama, parallelized by ``parallel``, up to ``steps``;
    returns the losses of the steps it trained."""
    dp = world // parallel.get("tp", 1) if parallel.get("fsdp") else 1
    gm = parallelize(converted_llama([], rows=BATCH // dp, with_loss=True), parallel)
    return train(gm, resume_config(checkpoint_dir, steps)).losses


def gpt2_tensor_parallel(rank: int, world: int, rows: Sequence[int]):
    """The tiny GPT-2 tensor-parallel by :data:`GPT2_PLAN` over all ranks, with and without
    sequence parallelism: for each, the loss and gradients of one batch of each of ``rows``
    (the graph's batch dim is symbolic), every parameter's placements, and how many
    all-gathers those steps' forward and backward ran."""
    from torch.distributed.tensor.debug import CommDebugMode

    results = {}
    for sequence_parallel in (False, True):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        options = {"plan": GPT2_PLAN, "sequence_parallel": sequence_parallel}
        gm = parallelize(gpt2_graph(), options, mesh)
        steps, gathers = [], 0
        for n in rows:
            with CommDebugMode() as comm:  # one per step: its module tracker breaks on reuse
                loss = seeded_step(gm, n)
            gathers += comm.get_comm_counts()[torch.ops.c10d_functional.all_gather_into_tensor]
            steps.append((loss, take_grads(gm)))
        placements = {n: tuple(p.placements) for n, p in gm.named_parameters()}
        results[sequence_parallel] = (steps, placements, gathers)
    return results


def run_config(rank: int, world: int, text: str, out: str, rows: Sequence[int]):
    """``torchgraft run`` of the config ``text`` on every rank, then the trained module on a
    batch of each of ``rows``: its losses, and per row count the loss and gradients, or the
    error it raised."""
    result = run_job(parse_config(text), out_dir=out)
    fed: dict[int, Any] = {}
    for n in rows:
        try:
            fed[n] = loss_and_grads(result.module, n)
        except ValueError as exc:
            fed[n] = str(exc)
    return result.train.losses, result.metrics["dynamic_batch"], fed
