"""``wsd``: the warmup-stable-decay LR schedule.

Linear warmup to the peak LR, a long constant stage, then a short decay to
``min_lr_ratio`` over the last ``decay_fraction`` of the run (Hu et al., MiniCPM, 2024;
Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", 2024, who find the ``1-sqrt`` decay best). Unlike cosine, the stable stage
does not depend on the run's length, so a run can be extended from a checkpoint taken
before the decay. It replaces the built-in warmup-cosine schedule; handlers'
``lr_multiplier`` factors still apply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import torchgraft as tg

__all__ = ["WarmupStableDecay", "wsd"]

Shape = Literal["linear", "1-sqrt", "cosine"]


def wsd(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    min_lr_ratio: float,
    shape: Shape,
) -> float:
    """LR factor at optimizer update ``step`` (0-based): ``(step + 1) / warmup_steps`` in
    the warmup, 1 until ``total_steps - decay_steps``, then down to ``min_lr_ratio`` at
    ``total_steps`` along ``shape``, flat after that."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = max(total_steps - decay_steps, warmup_steps)
    if step < start:
        return 1.0
    progress = min((step - start) / max(total_steps - start, 1), 1.0)
    if shape == "linear":
        left = 1.0 - progress
    elif shape == "1-sqrt":
        left = 1.0 - math.sqrt(progress)
    else:
        left = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * left


@tg.register_handler("wsd")
class WarmupStableDecay(tg.Handler):
    """Warmup-stable-decay LR schedule for the whole run."""

    @dataclasses.dataclass(kw_only=True)
    class Options:
        warmup_steps: int = 10
        """Updates of linear warmup."""
        decay_fraction: float = 0.2
        """Fraction of the run's updates spent decaying, at its end."""
        min_lr_ratio: float = 0.0
        """LR at the end of the decay, as a fraction of the peak."""
        shape: Shape = "1-sqrt"
        """Decay curve: ``linear``, ``1-sqrt`` (1 - sqrt(progress)) or ``cosine``."""

        def validate(self) -> None:
            if self.warmup_steps < 0:
                raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
            if not 0.0 <= self.decay_fraction <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
                raise ValueError("decay_fraction and min_lr_ratio must be in [0, 1]")

    def lr_schedule(self, total_steps: int) -> Callable[[int], float]:
        o = self.options
        return functools.partial(
            wsd,
            warmup_steps=o.warmup_steps,
            total_steps=total_steps,
            decay_steps=round(o.decay_fraction * total_steps),
            min_lr_ratio=o.min_lr_ratio,
            shape=o.shape,
        )
