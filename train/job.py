"""The main job behind ``torchgraft run``: capture, convert, verify, parallelize, compile,
train, and write ``metrics.json`` (and ``loss.png`` against the unconverted baseline)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from torchgraft.config import Config, ConfigError
from torchgraft.ir.dynamic_batch import has_dynamic_batch
from torchgraft.passes import PassManager
from torchgraft.passes.compile_stage import cache_counts
from torchgraft.passes.parallelize import (
    data_parallel_degree,
    parallelize,
    set_collective_timeout,
)
from torchgraft.passes.report import Report
from torchgraft.train.config import TrainConfig
from torchgraft.train.loop import NonFiniteError, TrainResult, train
from torchgraft.train.strict_json import dumps_strict

METRICS_FILE = "metrics.json"
LOSS_PLOT_FILE = "loss.png"
BASELINE_CHECKPOINTS = "baseline"
"""Subdirectory of ``train.checkpoint_dir`` holding the unconverted baseline's checkpoints."""
STATUS_FINISHED = "finished"
"""``metrics.json`` ``status``: every step ran."""
STATUS_NONFINITE = "nonfinite"
"""``metrics.json`` ``status``: stopped at the non-finite limit (``max_nonfinite_in_a_row``)."""
STATUS_ALREADY_FINISHED = "already_finished"
"""The resumed run had no step left; its ``metrics.json`` was kept as it was."""


@dataclasses.dataclass
class JobResult:
    """What :func:`run_job` did; ``metrics`` is what it wrote to ``metrics.json``."""

    out_dir: Path
    report: Report
    train: TrainResult
    baseline: TrainResult | None
    metrics: dict[str, Any]
    status: str = STATUS_FINISHED
    """:data:`STATUS_FINISHED` or :data:`STATUS_ALREADY_FINISHED` (a non-finite stop raises
    :class:`NonFiniteError` after writing ``metrics.json``)."""
    module: nn.Module | None = None
    """The trained module (``forward(tokens, labels)`` → loss): parallelized and compiled as
    the config says. With ``metrics["dynamic_batch"]`` it takes any batch size."""


def run_job(
    config: Config,
    *,
    steps: int | None = None,
    out_dir: str | Path | None = None,
    dump_ir: str | Path | None = None,
    progress: bool | None = None,
) -> JobResult:
    """Run ``config`` end to end. ``steps`` / ``out_dir`` override ``train.steps`` /
    ``output.dir``; ``dump_ir`` writes the graph after each handler to that directory (and,
    with joint-stage handlers, the rewritten joint graph and its forward / backward; with
    compile-stage handlers, each post-grad graph Inductor compiles, over those handlers,
    in ``compile_forward/`` and ``compile_backward/``).

    A run stopped by the non-finite limit writes ``metrics.json`` (``status: nonfinite``,
    the steps done) and re-raises :class:`NonFiniteError`. A resumed run that has no step
    left keeps the ``metrics.json`` it wrote when it finished."""
    train_config = _train_config(config, steps, progress)
    out = Path(out_dir if out_dir is not None else config.output.dir)
    config.import_modules()
    pm = config.pass_manager()
    check_stages(config, pm)  # before any work
    model = config.build_model()
    batch = _capture_inputs(config, train_config, model)
    module_report = pm.convert_module(model)  # module-stage handlers, before capture
    wanted = config.dynamic_batch(pm.stages)
    gm, inputs = config.judged_graph(model, batch, strict=True, dynamic_batch=wanted)
    dynamic = has_dynamic_batch(gm)  # wanted, and the model allowed it
    pm.inputs = inputs  # what verify runs the graph on
    if dump_ir is not None:
        from torchgraft.tools.ir_dump import dump_ir as write_ir_dump

        write_ir_dump(gm, list(config.handlers), dump_ir)
    report = pm.run(gm).merge(module_report)
    cache_before = cache_counts()
    rewrite = None
    if dump_ir is not None and "compile" in pm.stages:  # written as Inductor compiles them
        from torchgraft.tools.ir_dump import compile_dumper

        rewrite = compile_dumper(pm, list(config.handlers), dump_ir)
    runnable = _parallelize_and_compile(
        config, pm.joint_module(gm, report), pm, report, rewrite=rewrite
    )
    hooks = [*pm.handlers, *_train_timeout(config)]
    try:
        result = train(runnable, train_config, handlers=hooks)
    except NonFiniteError as exc:
        metrics = _metrics(
            config, report, exc.result, None, train_config, dynamic, STATUS_NONFINITE
        )
        _write_metrics(out, metrics)
        raise
    cache = {k: v - cache_before[k] for k, v in cache_counts().items()}
    if dump_ir is not None and "joint" in pm.stages:  # traced during the first step
        from torchgraft.passes.joint import dump_joint

        dump_joint(runnable, dump_ir)
    if not result.losses and (out / METRICS_FILE).is_file():
        kept = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
        return JobResult(out, report, result, None, kept, STATUS_ALREADY_FINISHED, module=runnable)
    baseline = None
    if config.train.compare_baseline:
        baseline_gm, _ = config.judged_graph(
            config.build_model(), batch, strict=True, dynamic_batch=dynamic
        )
        baseline_config = baseline_train_config(train_config)
        try:
            baseline = train(_parallelize_and_compile(config, baseline_gm), baseline_config)
        except NonFiniteError as exc:
            metrics = _metrics(
                config, report, result, exc.result, train_config, dynamic, STATUS_NONFINITE
            )
            _write_metrics(out, metrics)
            raise
    metrics = _metrics(config, report, result, baseline, train_config, dynamic)
    if config.compile.enabled:
        metrics["compile"] = cache
    if not is_main_process():
        return JobResult(out, report, result, baseline, metrics, module=runnable)
    _write_metrics(out, metrics)
    if baseline is not None:
        from torchgraft.train.plot import plot_losses

        rewrote = [name for name, count in report.matches.items() if count]
        converted = f"converted ({' + '.join(rewrote) or 'nothing rewritten'})"
        plot_losses(
            {converted: result.history, "baseline": baseline.history},
            out / LOSS_PLOT_FILE,
            reference="baseline",
        )
    return JobResult(out, report, result, baseline, metrics, module=runnable)


class _TrainTimeout:
    """Switches the collectives to ``parallel.train_timeout_s`` after the first applied
    step (the init timeout covers joining, sharding and the first, compiling, step)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.done = False

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        if not self.done:
            set_collective_timeout(self.timeout_s)
            self.done = True


def _train_timeout(config: Config) -> list[_TrainTimeout]:
    return [_TrainTimeout(config.parallel.train_timeout_s)] if config.parallel.enabled else []


def baseline_train_config(train_config: TrainConfig) -> TrainConfig:
    """The baseline's settings: the converted run's, with its own checkpoint directory."""
    if train_config.checkpoint_dir is None:
        return train_config
    directory = Path(train_config.checkpoint_dir) / BASELINE_CHECKPOINTS
    return dataclasses.replace(train_config, checkpoint_dir=directory)


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(dumps_strict(metrics) + "\n", encoding="utf-8")


def _train_config(config: Config, steps: int | None, progress: bool | None) -> TrainConfig:
    train_config = config.train.to_train_config()
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if progress is not None:
        overrides["progress"] = progress
    return dataclasses.replace(train_config, **overrides) if overrides else train_config


def is_main_process() -> bool:
    """Rank 0 under ``torchrun``, or a single process: the one that writes and prints."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _capture_inputs(
    config: Config, train_config: TrainConfig, model: nn.Module
) -> tuple[torch.Tensor, ...]:
    """The example inputs to capture with: one training batch as ``model.inputs`` (or,
    omitted, ``train``) gives it — ``(tokens,)`` for ``forward(tokens)`` returning logits,
    ``(tokens, labels)`` for ``forward(tokens, labels)`` returning the loss — or one
    data-parallel rank's rows of it under FSDP (whose graph takes the global batch, and, its
    batch dimension captured static, only that size)."""
    specs = config.batch_specs(model)
    where = config.locations.get("model.inputs") or config.locations.get("model")
    batch = (train_config.batch_size, train_config.seq_len)
    inputs = config.example_inputs(seed=train_config.seed, model=model)
    if all(t.dim() == 2 for t in inputs) and any(tuple(s.shape) != batch for s in specs):
        raise ConfigError(
            f"model.inputs {[list(s.shape) for s in specs]} must each be the training batch "
            f"[train.batch_size, train.seq_len] = {list(batch)} (the captured graph has static "
            "shapes)",
            where,
        )
    parallel = config.parallel
    dp = data_parallel_degree(parallel.tp, parallel.fsdp, int(os.environ.get("WORLD_SIZE", "1")))
    if train_config.batch_size % dp:
        raise ConfigError(
            f"train.batch_size {train_config.batch_size} is not divisible by the {dp} "
            "data-parallel ranks",
            config.locations.get("train.batch_size") or where,
        )
    return tuple(t[: train_config.batch_size // dp] for t in inputs)


def _parallelize_and_compile(
    config: Config,
    gm: nn.Module,
    pm: PassManager | None = None,
    report: Report | None = None,
    rewrite: Callable[[fx.GraphModule], Report] | None = None,
) -> nn.Module:
    """Parallelize and compile as the config says; ``pm``'s compile-stage handlers run
    inside the compile (matches merged into ``report``; ``rewrite`` as
    :meth:`~torchgraft.PassManager.compile_module` takes it)."""
    module: nn.Module = gm
    if config.parallel.enabled:
        module = parallelize(gm, config.parallel)
    if config.compile.enabled:
        if pm is None:
            return torch.compile(module)
        module = pm.compile_module(module, report, rewrite=rewrite)
    return module


def check_stages(config: Config, pm: PassManager) -> None:
    """Refuse stage combinations this job cannot run, naming the handlers and config keys."""

    def names(stage: str) -> str:
        return ", ".join(f"'{s.name}'" for s in pm.stage_steps(stage))

    if "joint" in pm.stages and config.parallel.enabled:
        raise ConfigError(
            f"handler(s) {names('joint')} run at stage 'joint', which cannot be combined with "
            "tensor parallelism or FSDP yet (the joint step is traced over plain tensors); set "
            "parallel.tp: 1 and parallel.fsdp: false, or drop those handlers",
            config.locations.get("parallel"),
        )
    if "joint" in pm.stages and config.compile.enabled:
        raise ConfigError(
            f"handler(s) {names('joint')} run at stage 'joint', whose partitioned forward and "
            "backward graphs run eagerly: compile.enabled is not supported with them yet; set "
            "compile.enabled: false, or drop those handlers",
            config.locations.get("compile"),
        )
    if "compile" in pm.stages and not config.compile.enabled:
        raise ConfigError(
            f"handler(s) {names('compile')} run at stage 'compile' (inside torch.compile) but "
            "compile.enabled is false, so they would never run; set compile: {enabled: true}",
            config.locations.get("compile") or config.locations.get("handlers"),
        )


def _metrics(
    config: Config,
    report: Report,
    result: TrainResult,
    baseline: TrainResult | None,
    train_config: TrainConfig,
    dynamic_batch: bool,
    status: str = STATUS_FINISHED,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "config": str(config.path) if config.path else None,
        "status": status,
        "steps": result.steps,
        "losses": result.history,
        "start_step": result.start_step,
        "handlers": [{"name": name, "matches": count} for name, count in report.matches.items()],
        "stages": report.stages,
        "stage_matches": report.stage_matches(),
        "tokens_per_s": result.tokens_per_s,
        "skipped_steps": result.skipped_steps,
        "wall_s": result.wall_s,
        "batch_size": train_config.batch_size,
        "seq_len": train_config.seq_len,
        "dynamic_batch": dynamic_batch,
        "compiled": config.compile.enabled,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if report.sqnr:
        metrics["sqnr_db"] = [dataclasses.asdict(s) for s in report.sqnr.values()]
    if baseline is not None:
        metrics["baseline_losses"] = baseline.history
        metrics["baseline_tokens_per_s"] = baseline.tokens_per_s
    return metrics
