"""Learning-rate schedule: linear warmup, then cosine decay to a floor (or the schedule a
handler supplies), times handler factors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer update ``step`` (0-based).

    Warmup (``step < warmup_steps``): ``(step + 1) / warmup_steps``, so the first update
    already moves and update ``warmup_steps - 1`` uses the full LR. Then a half cosine from
    1 at ``step = warmup_steps`` down to ``min_lr_ratio`` at ``step = total_steps``, flat
    after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    multipliers: Sequence[Callable[[int], float]] = (),
    schedule: Callable[[int], float] | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` scaling each group's LR by :func:`warmup_cosine` (or ``schedule``,
    a handler's, see :func:`handler_schedule`) times every multiplier.

    ``multipliers`` are handlers' ``lr_multiplier(step)`` methods; ``step`` is the number of
    optimizer updates applied so far (skipped non-finite steps do not advance it).
    """

    def factor(step: int) -> float:
        if schedule is not None:
            value = schedule(step)
        else:
            value = warmup_cosine(
                step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
            )
        for multiplier in multipliers:
            value *= multiplier(step)
        return value

    return LambdaLR(optimizer, factor)


def handler_schedule(handlers: Sequence[object], total_steps: int) -> Callable[[int], float] | None:
    """The LR schedule a handler supplies (``lr_schedule(total_steps)`` not None), or None;
    two handlers supplying one is a ``ValueError`` (an ``overlap`` problem of the plan)."""
    found = []
    for handler in handlers:
        method = getattr(handler, "lr_schedule", None)
        schedule = method(total_steps) if method is not None else None
        if schedule is not None:
            found.append((getattr(handler, "display_name", type(handler).__name__), schedule))
    if len(found) > 1:
        raise ValueError(
            f"handlers {', '.join(repr(n) for n, _ in found)} each supply the LR schedule; "
            "a run has one schedule"
        )
    return found[0][1] if found else None
