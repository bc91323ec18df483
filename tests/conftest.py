"""Shared fixtures: the tiny Llama model, its tokens, and its exported graph."""

from __future__ import annotations

import pytest
import torch

import torchgraft as tg
from torchgraft.models import build_llama


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def llama() -> torch.nn.Module:
    return build_llama("tiny", seed=0)


@pytest.fixture
def llama_gm(llama, tokens):
    return tg.capture(llama, (tokens,))
