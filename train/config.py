"""``TrainConfig``: every knob of the training loop, validated on construction."""

from __future__ import annotations

import dataclasses
from pathlib import Path


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
        positive = ("batch_size", "seq_len", "checkpoint_every", "max_nonfinite_in_a_row")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.resume=True needs a checkpoint_dir")
