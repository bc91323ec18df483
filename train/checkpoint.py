"""Checkpoints for exact resume, written with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is the directory ``<checkpoint_dir>/step-<k>`` holding the model and
optimizer state (FQN-keyed, via ``get_state_dict``), the LR scheduler, the data position,
the global torch RNG state and the loop counters after step ``k``, plus torchgraft's
manifest (:mod:`torchgraft.train.manifest`): the run it belongs to, the losses so far, and
each file's sha256.

A save is all or nothing: DCP writes into ``.step-<k>.partial``, the manifest is written
last, and only then is the directory renamed to ``step-<k>`` (an existing ``step-<k>`` is
moved aside first and deleted after). A process killed at any moment leaves the previous
complete checkpoints as they were; the next save removes the leftover ``.partial``.

A loaded checkpoint is verified first (every file against the manifest), must come from
the same model (parameter names, shapes, dtypes) and the same training settings; a
different ``steps`` only warns (:class:`CheckpointWarning`), since extending a run is
legitimate, but the LR schedule then differs from a run started with the new count.

Distributed runs use it unchanged: DTensor parameters and optimizer states (tensor parallel,
FSDP2) are written as shards by their ranks and resharded on load, so a checkpoint saved by
one world size or layout resumes under another (one process, TP over 2 ranks, FSDP over 2:
``tests/test_parallel.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

from torchgraft.train import manifest
from torchgraft.train.data import RandomWindows
from torchgraft.train.manifest import CheckpointError

_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointWarning(UserWarning):
    """A resumed run differs from the run that wrote the checkpoint in a way that is
    allowed but changes the result (another ``steps``)."""


@dataclasses.dataclass
class Resumed:
    """What :meth:`Checkpointer.load` restored besides the states."""

    loop: dict[str, int]
    """The loop counters (``step`` done, ``nonfinite_in_a_row``)."""
    losses: list[float]
    """The loss of every step before ``loop["step"]`` (``nan`` for skipped steps)."""


def check_directory(directory: str | Path, *, resume: bool) -> None:
    """Refuse a ``checkpoint_dir`` a run cannot own: a path that is not a directory, or,
    for a fresh (not resumed) run, a directory that already holds checkpoints."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint_dir {path} exists and is not a directory")
    if not resume and (found := _step_dirs(path)):
        raise CheckpointError(
            f"checkpoint_dir {path} already holds checkpoints ({found[-1][1].name}) of another "
            "run: set resume: true to continue that run, or choose an empty directory"
        )


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of each ``step-<k>`` entry of ``directory``, by step."""
    if not directory.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _STEP_DIR.fullmatch(path.name))
    )


class Checkpointer:
    """Saves and restores one training run's state under ``directory``.

    ``settings`` are the training settings the run's trajectory depends on (seed, batch
    shape, optimizer and schedule); a checkpoint written with other settings is refused.

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
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.settings = dict(settings or {})
        self.run_id = uuid.uuid4().hex
        self._materialize_optimizer_state()

    def save(self, loop: dict[str, int], losses: Sequence[float] = ()) -> Path:
        """Write a checkpoint for ``loop["step"]`` (steps done; ``losses`` of every step so
        far) and return its directory."""
        path = self.directory / f"step-{loop['step']}"
        partial = self.directory / f".{path.name}.partial"
        state = self._state(loop)
        if _is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=partial)
        if _is_main():
            manifest.write_manifest(partial, self._manifest(loop, losses, state["model"]))
            _replace_directory(partial, path)
        _barrier()
        return path

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or ``None``. A ``step-<k>`` directory
        without a manifest was not written by this version of torchgraft: refused."""
        _restore_moved_aside(self.directory)
        _barrier()
        found = _step_dirs(self.directory)
        if not found:
            return None
        path = found[-1][1]
        manifest.read_manifest(path)
        return path

    def load(self, path: Path, loop: dict[str, int]) -> Resumed:
        """Verify and restore everything from ``path``; returns the saved loop counters
        (same keys as the ``loop`` template) and losses."""
        content = manifest.verify(path)
        state = self._state(dict(loop))
        self._check_run(path, content, state["model"])
        reader = manifest.SafeReader(path)
        reader.read_metadata()  # refuses a crafted .metadata here, before DCP retries it
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=manifest.SafeLoadPlanner())
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.run_id = content["run_id"]
        return Resumed(state["loop"], manifest.decode_losses(content.get("losses", [])))

    def _manifest(
        self, loop: Mapping[str, int], losses: Sequence[float], model_state: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step": loop["step"],
            "model": manifest.model_fingerprint(model_state),
            "settings": self.settings,
            "losses": manifest.encode_losses(losses),
        }

    def _check_run(
        self, path: Path, content: Mapping[str, Any], model_state: Mapping[str, Any]
    ) -> None:
        """Refuse another model's checkpoint or other settings; warn on another ``steps``."""
        if content.get("model") != manifest.model_fingerprint(model_state):
            raise CheckpointError(
                f"{path} was written by another model (its parameter names, shapes or dtypes "
                "differ): refusing to load it into this one"
            )
        saved = content.get("settings", {})
        changed = {
            key: (saved.get(key), value)
            for key, value in self.settings.items()
            if key != "steps" and saved.get(key) != value
        }
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise CheckpointError(
                f"{path} was written with other training settings ({listed}); resume with the "
                "same settings, or start a new run in an empty checkpoint_dir"
            )
        old, new = saved.get("steps"), self.settings.get("steps")
        if old != new:
            warnings.warn(
                f"resuming {path} of a run planned for {old} steps with steps={new}: the LR "
                f"schedule now decays over {new} steps, so the losses differ from a run started "
                f"with {new}",
                CheckpointWarning,
                stacklevel=3,
            )

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


def _replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first, so a
    crash leaves either the old or the new directory (or neither, never a mix)."""
    if target.exists():
        aside = target.with_name(f".{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)
        source.rename(target)
        shutil.rmtree(aside)
    else:
        source.rename(target)


def _restore_moved_aside(directory: Path) -> None:
    """Put back a ``step-<k>`` that a killed overwrite moved aside (``.step-<k>.old``) but
    did not replace."""
    if not (directory.is_dir() and _is_main()):
        return
    for aside in directory.glob(".step-*.old"):
        target = aside.with_name(aside.name[1 : -len(".old")])
        if not target.exists():
            aside.rename(target)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that, without a process group, it saves/loads in one process
    (the intended use here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield
