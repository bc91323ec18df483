"""Models no one here wrote: a Hugging Face ``transformers`` causal LM as it ships, built
from a config (random weights; nothing is downloaded). ``torchgraft run`` adds the
next-token loss in the graph (:class:`torchgraft.train.lm.NextTokenLoss`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
