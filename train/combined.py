"""Several optimizers stepping as one ``torch.optim.Optimizer``.

The training loop, the LR scheduler, the step hooks and the checkpointer all take one
optimizer; when handlers claim parameters for their own optimizers (Muon on the matrices,
AdamW on the rest), :class:`CombinedOptimizer` presents them as one. Its ``param_groups``
are the children's group dicts themselves and its ``state`` is shared with every child,
so ``LambdaLR`` scales every child's LR, and ``state_dict`` / ``load_state_dict`` (and
``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict``) save and
restore every child's state exactly, keyed like any optimizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Steps each child optimizer in turn; one set of param groups, state and hooks."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point every child at this optimizer's group dicts and state (again after a load,
        which replaces both)."""
        start = 0
        for child in self.optimizers:
            count = len(child.param_groups)
            child.param_groups = self.param_groups[start : start + count]
            child.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for child in self.optimizers:
            child.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
