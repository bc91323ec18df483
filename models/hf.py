"""Models no one here wrote: a Hugging Face ``transformers`` causal LM with its loss in the
graph, built from a config (random weights; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMWithLoss(nn.Module):
    """``forward(tokens, labels)`` → mean next-token loss of a Hugging Face causal LM.

    ``labels`` are already shifted (as torchgraft's data pipeline makes them), so the loss
    is computed here as ``cross_entropy(logits, labels)``, not by the model (which would
    shift them again). The projection + cross-entropy pair is then visible to handlers
    such as ``chunked_cross_entropy``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


def build_hf_llama(*, seed: int = 0, **config: Any) -> CausalLMWithLoss:
    """A ``transformers.LlamaForCausalLM`` from ``LlamaConfig(**config)`` with random weights."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ImportError(
            "build_hf_llama needs the 'transformers' package: pip install transformers "
            "(it is in torchgraft's dev extra)"
        ) from exc
    torch.manual_seed(seed)
    config.setdefault("attn_implementation", "sdpa")
    return CausalLMWithLoss(LlamaForCausalLM(LlamaConfig(**config)))


def build_causal_lm(model_type: str, *, seed: int = 0, **config: Any) -> nn.Module:
    """A ``transformers`` causal LM as its authors wrote it, from
    ``AutoConfig.for_model(model_type, **config)`` with random weights (nothing is
    downloaded), e.g. ``build_causal_lm("gpt2", n_embd=64, n_layer=2, n_head=4)``.

    ``torchgraft run`` trains it as it is: its ``forward(input_ids)`` returns a
    ``ModelOutput`` with ``logits``, to which torchgraft adds the next-token loss."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise ImportError(
            "build_causal_lm needs the 'transformers' package: pip install transformers "
            "(it is in torchgraft's dev extra)"
        ) from exc
    torch.manual_seed(seed)
    config.setdefault("attn_implementation", "sdpa")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
