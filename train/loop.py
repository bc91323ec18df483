"""The training loop: forward, backward, clip, skip non-finite steps, step, checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from torchgraft.train.checkpoint import Checkpointer, check_directory
from torchgraft.train.config import TrainConfig
from torchgraft.train.data import RandomWindows, load_tokens
from torchgraft.train.optim import build_optimizer, register_handler_hooks
from torchgraft.train.schedule import build_scheduler, handler_schedule


@dataclasses.dataclass
class TrainResult:
    """What one :func:`train` call did."""

    losses: list[float]
    """Loss of each step attempted in this call (``nan`` for skipped steps);
    ``losses[i]`` belongs to step ``start_step + i``."""
    start_step: int
    """Step this call started from: 0, or the step of the checkpoint it resumed."""
    steps: int
    """Optimizer updates applied in this call."""
    skipped_steps: int
    """Steps skipped in this call because the loss or a gradient was not finite."""
    tokens_per_s: float
    """Tokens of all attempted steps divided by ``wall_s``."""
    wall_s: float
    """Seconds spent in the step loop (setup and resume excluded, checkpoint saves included)."""
    history: list[float] = dataclasses.field(default_factory=list)
    """Loss of every step of the run from step 0: the resumed checkpoint's, then ``losses``."""


class NonFiniteError(RuntimeError):
    """Raised after ``max_nonfinite_in_a_row`` consecutive steps with a non-finite loss or
    gradient."""

    def __init__(self, step: int, in_a_row: int, result: TrainResult | None = None) -> None:
        super().__init__(
            f"{in_a_row} consecutive steps (the last one step {step}) had a non-finite loss or "
            "gradient and were skipped; stopping. Lower the learning rate, check grad_clip, or "
            "check the numerics of the model's conversions."
        )
        self.step = step
        self.in_a_row = in_a_row
        self.result = result
        """What the run did up to the stop (its ``losses`` end with the skipped steps)."""


def train(model: nn.Module, config: TrainConfig, handlers: Sequence[object] = ()) -> TrainResult:
    """Train ``model`` on byte-level text and return the losses and counts.

    ``model`` is any module (an ``nn.Module`` or a ``GraphModule`` from
    ``torch.export.export(...).module()``) whose ``forward(tokens, labels)`` returns a scalar
    loss; its train/eval mode is left as it is (exported modules refuse ``.train()``).
    ``handlers`` may define, each optionally: ``optimizer_claims()`` and ``param_groups()``
    (see :func:`~torchgraft.train.optim.build_optimizer`), ``lr_schedule(total_steps)``
    (replaces warmup-cosine, see :func:`~torchgraft.train.schedule.handler_schedule`),
    ``lr_multiplier(step) -> float`` (multiplies the scheduled LR; ``step`` counts applied
    updates), and
    ``pre_optimizer_hook(model_parts)`` / ``post_optimizer_hook(model_parts)``, run through
    the optimizer's step hooks around every applied step with ``model_parts == [model]``.

    A graph parallelized by :func:`torchgraft.passes.parallelize.parallelize` trains as it is
    under ``torchrun``: every rank draws the same batches and gets the same global loss.

    A step whose loss or global gradient norm is not finite is skipped: no optimizer step,
    no scheduler advance, gradients cleared; :class:`NonFiniteError` is raised after
    ``config.max_nonfinite_in_a_row`` such steps in a row (its ``result`` holds the steps
    done). A ``checkpoint_dir`` is checked before anything else
    (:func:`~torchgraft.train.checkpoint.check_directory`).
    """
    if config.checkpoint_dir is not None:
        check_directory(config.checkpoint_dir, resume=config.resume)
    torch.manual_seed(config.seed)
    data = RandomWindows(
        load_tokens(config.data_path, seq_len=config.seq_len),
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    optimizer = build_optimizer(model, config, handlers)
    optimizer.zero_grad(set_to_none=True)
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        min_lr_ratio=config.min_lr_ratio,
        multipliers=[h.lr_multiplier for h in handlers if hasattr(h, "lr_multiplier")],
        schedule=handler_schedule(handlers, config.steps),
    )
    loop = {"step": 0, "nonfinite_in_a_row": 0}
    history: list[float] = []
    checkpointer = None
    if config.checkpoint_dir is not None:
        checkpointer = Checkpointer(
            config.checkpoint_dir,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data=data,
            settings=trajectory_settings(config),
        )
        latest = checkpointer.latest() if config.resume else None
        if latest is not None:
            resumed = checkpointer.load(latest, loop)
            loop, history = resumed.loop, resumed.losses
    register_handler_hooks(optimizer, handlers, [model])

    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = math.inf if config.grad_clip is None else config.grad_clip
    tokens_per_step = config.batch_size * config.seq_len
    result = TrainResult(
        losses=[],
        start_step=loop["step"],
        steps=0,
        skipped_steps=0,
        tokens_per_s=0.0,
        wall_s=0.0,
        history=history,
    )
    start = time.perf_counter()
    # Under torchrun every rank trains and sees the same loss: one progress bar is enough.
    progress = config.progress and (not dist.is_initialized() or dist.get_rank() == 0)
    with tqdm(total=config.steps, initial=loop["step"], disable=not progress, desc="train") as bar:
        while loop["step"] < config.steps:
            tokens, labels = next(data)
            loss = model(tokens, labels)
            value = loss.item()
            finite = math.isfinite(value)
            if finite:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                finite = bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                scheduler.step()
                result.steps += 1
                loop["nonfinite_in_a_row"] = 0
            else:
                result.skipped_steps += 1
                loop["nonfinite_in_a_row"] += 1
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(value if finite else math.nan)
            result.history.append(result.losses[-1])
            loop["step"] += 1
            result.wall_s = time.perf_counter() - start
            if loop["nonfinite_in_a_row"] >= config.max_nonfinite_in_a_row:
                raise NonFiniteError(loop["step"] - 1, loop["nonfinite_in_a_row"], result)
            if checkpointer is not None and loop["step"] % config.checkpoint_every == 0:
                checkpointer.save(loop, result.history)
            result.wall_s = time.perf_counter() - start
            result.tokens_per_s = len(result.losses) * tokens_per_step / result.wall_s
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{result.tokens_per_s:,.0f}", refresh=False)
            bar.update()
    return result


def trajectory_settings(config: TrainConfig) -> dict[str, object]:
    """The settings a run's trajectory depends on, as JSON values: a checkpoint records
    them and a resumed run must match them (``steps`` may differ, with a warning)."""
    names = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps")
    names += ("weight_decay", "grad_clip", "seed")
    return {**{name: getattr(config, name) for name in names}, "betas": list(config.betas)}
