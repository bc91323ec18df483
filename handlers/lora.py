"""``lora``: low-rank adapters on linears (module stage).

Every ``nn.Linear`` whose FQN matches ``targets`` becomes a :class:`LoRALinear`:
``y = base(x) + (alpha / rank) · (x Aᵀ) Bᵀ`` with ``A`` (rank × in) Kaiming-uniform and
``B`` (out × rank) zero, so the converted model computes exactly what it did until ``B``
is trained. With ``freeze_base`` only the adapters train. It runs on the eager model
before capture, so the captured graph holds the adapters' own linears (under FQNs
``<linear>.lora_a`` / ``.lora_b``) and graph-stage handlers see them like any other op.

Example::

    pm = tg.PassManager([{"lora": {"targets": ["layers.*.attention.w?"], "rank": 8}}])
    pm.convert_module(model)                 # report.matches == {"lora": <linears wrapped>}
    gm = tg.capture(model, (tokens,))
"""

from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

import torchgraft as tg

__all__ = ["LoRA", "LoRALinear"]


class LoRALinear(nn.Module):
    """A frozen (or not) ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        a = torch.empty(rank, base.in_features, dtype=weight.dtype).uniform_(
            -bound, bound, generator=generator
        )
        self.lora_a = nn.Parameter(a.to(weight.device))
        self.lora_b = nn.Parameter(weight.new_zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


@tg.register_handler("lora")
class LoRA(tg.Handler):
    """Low-rank adapters on the linears named by ``targets``, on the eager model."""

    stage = "module"

    @dataclasses.dataclass(kw_only=True)
    class Options:
        targets: list[str] = dataclasses.field(default_factory=lambda: ["*"])
        """FQN globs of the ``nn.Linear`` modules to adapt (e.g. ``layers.*.attention.w?``)."""
        rank: int = 8
        """Rank of the update ``B A``."""
        alpha: float = 16.0
        """The update is scaled by ``alpha / rank``."""
        freeze_base: bool = True
        """Stop training the adapted linears' own weight and bias."""
        seed: int = 0
        """Seed of the adapters' initialization (``A``; ``B`` starts at zero)."""

        def validate(self) -> None:
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")

    def convert(self, model: nn.Module) -> nn.Module:
        """Wrap every targeted ``nn.Linear`` of ``model`` in place; returns ``model``."""
        options = self.options
        generator = torch.Generator().manual_seed(options.seed)
        targets = [
            (fqn, module)
            for fqn, module in model.named_modules()
            if fqn
            and isinstance(module, nn.Linear)
            and any(fnmatchcase(fqn, g) for g in options.targets)
        ]
        for fqn, linear in targets:
            if options.freeze_base:
                linear.requires_grad_(False)
            adapter = LoRALinear(linear, options.rank, options.alpha, generator)
            model.set_submodule(fqn, adapter)
        return model
