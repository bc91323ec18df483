"""Checkpoints for exact resume, written with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is the DCP directory ``<checkpoint_dir>/step-<k>`` holding the model and
optimizer state (FQN-keyed, via ``get_state_dict``), the LR scheduler, the data position,
the global torch RNG state and the loop counters after step ``k``. DCP writes the
``.metadata`` file last, so only directories that have one count as complete.

Distributed runs use it unchanged: DTensor parameters and optimizer states (tensor parallel,
FSDP2) are written as shards by their ranks and resharded on load, so a checkpoint saved by
one world size or layout resumes under another (one process, TP over 2 ranks, FSDP over 2:
``tests/test_parallel.py``).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

from torchgraft.train.data import RandomWindows

_STEP_DIR = re.compile(r"step-(\d+)")


class Checkpointer:
    """Saves and restores one training run's state under ``directory``.

    Construct it before any optimizer step hook is registered: it creates the optimizer's
    state up front (see :meth:`_materialize_optimizer_state`) so that saving never steps.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        data: RandomWindows,
    ) -> None:
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self._materialize_optimizer_state()

    def save(self, loop: dict[str, int]) -> Path:
        """Write a checkpoint for ``loop["step"]`` (steps done) and return its directory."""
        path = self.directory / f"step-{loop['step']}"
        with _quiet_single_process():
            dcp.save(self._state(loop), checkpoint_id=path)
        return path

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or ``None``."""
        found = [
            (int(match.group(1)), path)
            for path in (self.directory.iterdir() if self.directory.is_dir() else ())
            if (match := _STEP_DIR.fullmatch(path.name)) and (path / ".metadata").is_file()
        ]
        return max(found)[1] if found else None

    def load(self, path: Path, loop: dict[str, int]) -> dict[str, int]:
        """Restore everything from ``path``; returns the saved loop counters (same keys as
        the ``loop`` template)."""
        state = self._state(dict(loop))
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        return state["loop"]

    def _state(self, loop: dict[str, int]) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": torch.get_rng_state(),
            "loop": loop,
        }

    def _materialize_optimizer_state(self) -> None:
        """Create the optimizer state a fresh AdamW would create on its first step.

        ``get_state_dict`` fills an empty optimizer state by calling ``step()`` with zero
        grads and LR 0, which would fire the handlers' step hooks and count an extra Adam
        step. Doing it now, before any hook exists, and resetting the step counts leaves
        the state exactly as never stepped (zero moments, step 0). Needs ``grad is None``.
        """
        get_optimizer_state_dict(self.model, self.optimizer)
        for state in self.optimizer.state.values():
            state["step"].zero_()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that, without a process group, it saves/loads in one process
    (the intended use here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield
