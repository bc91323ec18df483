"""Multi-process worker for the optimizer-claim tests: Muon + AdamW on an FSDP2 model."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.train.optim import build_optimizer


def muon_under_fsdp(rank: int, world_size: int, config) -> dict[str, torch.Tensor]:
    """Three optimizer steps of the tiny Llama under FSDP2 with ``muon``; full weights."""
    model = build_llama("tiny", with_loss=True, seed=0)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = build_optimizer(model, config, tg.PassManager(["muon"]).handlers)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, labels = (torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2))
        model(tokens, labels).backward()  # every rank: the same batch
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.full_tensor() for n, p in model.named_parameters()}
