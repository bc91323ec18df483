"""Checks of a command's inputs that need the file system, made before any work.

The config reader checks what a config says; these check what it points at, before a
model is built or a step trained: the training text, the checkpoint directory, and every
directory or file a command will write (``output.dir``, ``--out``, ``--dump-ir``,
``--write-expect``), so that a run never fails after training for a path it could have
refused up front. Each failure is a :class:`~torchgraft.config.ConfigError` naming the key
(with its ``file:line:col``) or the flag.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from torchgraft.config import Config, ConfigError
from torchgraft.passes.parallelize import data_parallel_degree
from torchgraft.train.checkpoint import CheckpointError, check_directory
from torchgraft.train.data import BUILTIN_CORPUS
from torchgraft.train.job import baseline_train_config


def check_run(
    config: Config, *, steps: int | None = None, out: str | None = None, dump_ir: str | None = None
) -> None:
    """Everything ``torchgraft run`` can check before it builds the model."""
    train = config.train if steps is None else dataclasses.replace(config.train, steps=steps)
    where = config.locations.get
    _check_data(config, train.data_path, train.seq_len)
    if train.checkpoint_dir is not None:
        directory = Path(train.checkpoint_dir)
        location = where("train.checkpoint_dir")
        check_output_dir(directory, "train.checkpoint_dir", location)
        try:
            check_directory(directory, resume=train.resume)
            if train.compare_baseline:
                baseline = baseline_train_config(train.to_train_config()).checkpoint_dir
                check_directory(baseline, resume=train.resume)
        except CheckpointError as exc:
            raise ConfigError(f"train.{exc}", location) from None
    if out is not None:
        check_output_dir(out, "--out")
    else:
        check_output_dir(config.output.dir, "output.dir", where("output.dir"))
    if dump_ir is not None:
        check_output_dir(dump_ir, "--dump-ir")
    _check_parallel(config)


def _check_data(config: Config, data_path: object, seq_len: int) -> None:
    key = "train.data_path" if data_path is not None else "train.seq_len"
    location = config.locations.get(key) or config.locations.get("train")
    path = BUILTIN_CORPUS if data_path is None else Path(str(data_path))
    if not path.exists():
        raise ConfigError(f"train.data_path: no such file {path}", location)
    if not path.is_file():
        raise ConfigError(f"train.data_path: {path} is not a file", location)
    size = path.stat().st_size
    if size < seq_len + 1:
        raise ConfigError(
            f"{key}: the training text {path} has {size} bytes; seq_len={seq_len} needs at "
            f"least {seq_len + 1} (one window of seq_len + 1 bytes)",
            location,
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(f"train.data_path: {path} is not readable", location)


def _check_parallel(config: Config) -> None:
    parallel = config.parallel
    if not parallel.enabled:
        return
    location = config.locations.get("parallel")
    if "RANK" not in os.environ:
        raise ConfigError(
            f"parallel: tp={parallel.tp}, fsdp={parallel.fsdp} needs a process group: launch "
            "with torchrun, e.g. torchrun --nproc_per_node 2 -m torchgraft run CONFIG",
            location,
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = data_parallel_degree(parallel.tp, parallel.fsdp, world)
    if dp < 1 or parallel.tp * dp != world:
        raise ConfigError(
            f"parallel: tp={parallel.tp} x {dp} data-parallel ranks must use all {world} ranks",
            location,
        )


def check_output_dir(path: str | Path, what: str, location: str | None = None) -> None:
    """``path`` is a writable directory, or one that can be created."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise ConfigError(f"{what}: {path} exists and is not a directory", location)
    if not existing.is_dir():
        raise ConfigError(f"{what}: cannot create {path}: {existing} is not a directory", location)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot write to {existing}", location)


def check_output_file(path: str | Path, what: str) -> None:
    """``path`` can be written as a file: not a directory, in a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{what}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot write to {parent}")


def check_graphviz() -> None:
    """Graphviz ``dot`` is on ``PATH`` (``torchgraft viz`` renders with it)."""
    if shutil.which("dot") is None:
        raise ConfigError(
            "Graphviz's 'dot' program is not on PATH; install the Debian/Ubuntu package "
            "'graphviz' (apt-get install graphviz) or Graphviz from https://graphviz.org/download/"
        )
