"""Optimizer claims under FSDP2: Muon + AdamW on sharded (DTensor) parameters updates them
as one process does (2 gloo ranks)."""

from __future__ import annotations

import dist_helpers as dh
import optim_workers
import torch

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.train import TrainConfig
from torchgraft.train.optim import build_optimizer


def test_muon_under_fsdp_matches_one_process():
    config = TrainConfig(steps=3, lr=1e-3, progress=False)
    ranks = dh.run_ranks(optim_workers.muon_under_fsdp, config)
    model = build_llama("tiny", with_loss=True, seed=0)
    optimizer = build_optimizer(model, config, tg.PassManager(["muon"]).handlers)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, labels = (torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2))
        model(tokens, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    initial = dict(build_llama("tiny", with_loss=True, seed=0).named_parameters())
    for name, param in model.named_parameters():
        assert not torch.equal(param, initial[name]), name  # every parameter was trained
        for rank in ranks:
            assert sqnr(rank[name], param.detach()) > 100.0, name
