"""torchgraft.train: a compact, deterministic training loop with handler hooks.

``train(model, TrainConfig(...), handlers)`` trains any module whose
``forward(tokens, labels)`` returns a loss on byte-level text, with AdamW, warmup + cosine
LR, gradient clipping, non-finite step skipping and exact-resume DCP checkpoints.
"""

from torchgraft.train.config import TrainConfig
from torchgraft.train.data import BUILTIN_CORPUS, RandomWindows, load_tokens
from torchgraft.train.loop import NonFiniteError, TrainResult, train
from torchgraft.train.optim import build_optimizer, build_param_groups
from torchgraft.train.schedule import build_scheduler, warmup_cosine

__all__ = [
    "BUILTIN_CORPUS",
    "NonFiniteError",
    "RandomWindows",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "load_tokens",
    "train",
    "warmup_cosine",
]
