"""``TrainConfig``: every knob of the training loop, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

MAX_SEED = 2**64 - 1
"""The largest seed ``torch.manual_seed`` takes."""


class FieldError(ValueError):
    """A config dataclass field has a bad value; ``field`` names it (so a config reader can
    point at the line it was written on)."""

    def __init__(self, owner: str, field: str, reason: str) -> None:
        super().__init__(f"{owner}.{field} {reason}")
        self.field = field
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of one :func:`torchgraft.train.train` run."""

    steps: int = 100
    """Total number of training steps (batches); a resumed run continues up to this count."""
    batch_size: int = 8
    """Sequences per batch."""
    seq_len: int = 128
    """Tokens (bytes) per sequence; each window read from the text is ``seq_len + 1`` bytes."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at ``lr * min_lr_ratio`` after ``steps`` optimizer updates."""
    warmup_steps: int = 10
    """Optimizer updates of linear warmup (0: start at the peak learning rate)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of the default group (norms, biases, embeddings get 0)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW ``betas``."""
    grad_clip: float | None = 1.0
    """Max global gradient L2 norm (``clip_grad_norm_``); ``None`` disables clipping."""
    seed: int = 0
    """Seeds the global torch RNG and the data sampler: same seed, same losses (on CPU)."""
    max_nonfinite_in_a_row: int = 5
    """Raise :class:`NonFiniteError` after this many consecutive skipped (non-finite) steps."""
    checkpoint_dir: str | Path | None = None
    """Directory of ``step-<k>`` checkpoints; ``None`` disables checkpointing."""
    checkpoint_every: int = 100
    """Save a checkpoint after every this many steps (needs ``checkpoint_dir``)."""
    resume: bool = False
    """Continue from the latest checkpoint in ``checkpoint_dir`` (start fresh if there is none)."""
    data_path: str | Path | None = None
    """UTF-8 text file to train on, one token per byte; ``None``: the built-in ``corpus.txt``."""
    progress: bool = True
    """Show a tqdm progress bar with the loss and tokens/s."""

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> FieldError:
            return FieldError("TrainConfig", name, f"{reason}, got {getattr(self, name)!r}")

        positive = ("steps", "batch_size", "seq_len", "checkpoint_every", "max_nonfinite_in_a_row")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite number > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "must be > 0 or None")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", "must be in [0, 2**64 - 1]")
        if self.resume and self.checkpoint_dir is None:
            raise FieldError("TrainConfig", "resume", "needs a checkpoint_dir")
