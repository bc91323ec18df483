"""Checkpoints belong to their run: a manifest verified before anything is read, no code run
from a checkpoint, atomic saves, separate baseline checkpoints, kept metrics."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchgraft import cli
from torchgraft.models.llama import build_llama
from torchgraft.train import TrainConfig, train
from torchgraft.train.checkpoint import CheckpointWarning
from torchgraft.train.manifest import MANIFEST, CheckpointError, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> TrainConfig:
    settings = dict(
        steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
        checkpoint_every=2, progress=False,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def model(seed: int = 0):
    return build_llama("tiny", with_loss=True, seed=seed)


class _RunsShell:
    """A pickle whose loading would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant_crafted_metadata(step_dir: Path, marker: Path) -> None:
    (step_dir / ".metadata").write_bytes(pickle.dumps(_RunsShell(f"touch {marker}")))


@pytest.mark.parametrize("forged_manifest", [False, True])
def test_crafted_metadata_pickle_is_refused_not_run(tmp_path, forged_manifest):
    directory = tmp_path / "ckpt"
    train(model(), tiny(steps=2, checkpoint_dir=directory))
    step = directory / "step-2"
    marker = tmp_path / "marker"
    content = read_manifest(step)
    _plant_crafted_metadata(step, marker)
    control = tmp_path / "control"  # the payload is live: plain unpickling runs it
    pickle.loads(pickle.dumps(_RunsShell(f"touch {control}")))
    assert control.exists()
    if forged_manifest:  # the attacker also rewrote the hashes: the unpickler still refuses
        (step / MANIFEST).unlink()
        write_manifest(step, {k: v for k, v in content.items() if k not in ("format", "files")})
    else:  # a directory without torchgraft's manifest is not read at all
        (step / MANIFEST).unlink()
    with pytest.raises(CheckpointError) as error:
        train(model(), tiny(steps=2, checkpoint_dir=directory, resume=True))
    message = str(error.value)
    assert ("not DCP metadata" in message) if forged_manifest else ("has no" in message)
    assert not marker.exists()


def test_corrupted_file_is_detected_and_named(tmp_path):
    directory = tmp_path / "ckpt"
    train(model(), tiny(steps=2, checkpoint_dir=directory))
    data_file = next((directory / "step-2").glob("*.distcp"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4096] = bytes(4096)  # 4 KiB zeroed in the middle
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{data_file.name} is corrupted"):
        train(model(), tiny(steps=4, checkpoint_dir=directory, resume=True))


def test_fresh_run_into_a_used_directory_is_refused(tmp_path):
    train(model(), tiny(steps=2, checkpoint_dir=tmp_path))
    with pytest.raises(CheckpointError, match="already holds checkpoints .step-2. of another run"):
        train(model(), tiny(steps=4, seed=1, checkpoint_dir=tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        train(model(), tiny(checkpoint_dir=tmp_path / "file"))


def test_resume_refuses_other_settings_or_model_and_warns_on_other_steps(tmp_path):
    train(model(), tiny(steps=2, checkpoint_dir=tmp_path))
    with pytest.raises(CheckpointError, match=r"other training settings \(seed: 0 -> 1\)"):
        train(model(), tiny(steps=2, seed=1, checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(CheckpointError, match="another model"):
        train(
            build_llama("tiny", with_loss=True, n_layers=1),
            tiny(steps=2, checkpoint_dir=tmp_path, resume=True),
        )
    with pytest.warns(CheckpointWarning, match="planned for 2 steps with steps=3"):
        resumed = train(model(), tiny(steps=3, checkpoint_dir=tmp_path, resume=True))
    assert resumed.start_step == 2 and len(resumed.losses) == 1 and len(resumed.history) == 3


def test_leftover_of_a_killed_save_is_ignored_and_replaced(tmp_path):
    """The deterministic equivalent of a kill during a save: a truncated ``.partial``."""
    plain = train(model(), tiny(steps=6, checkpoint_dir=tmp_path / "plain"))
    directory = tmp_path / "ckpt"
    train(model(), tiny(steps=4, checkpoint_dir=directory))
    partial = directory / ".step-6.partial"
    partial.mkdir()
    for path in (directory / "step-4").iterdir():
        if path.name != MANIFEST:
            (partial / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(CheckpointWarning):
        resumed = train(model(), tiny(steps=6, checkpoint_dir=directory, resume=True))
    assert resumed.start_step == 4 and resumed.history == plain.losses
    assert sorted(p.name for p in directory.iterdir()) == ["step-2", "step-4", "step-6"]


def test_overwrite_killed_between_its_renames_keeps_the_old_checkpoint(tmp_path):
    """A kill after ``step-4`` was moved aside and before the new one took its place."""
    plain = train(model(), tiny(steps=6, checkpoint_dir=tmp_path / "plain"))
    directory = tmp_path / "ckpt"
    train(model(), tiny(steps=4, checkpoint_dir=directory))
    (directory / "step-4").rename(directory / ".step-4.old")
    with pytest.warns(CheckpointWarning):
        resumed = train(model(), tiny(steps=6, checkpoint_dir=directory, resume=True))
    assert resumed.start_step == 4 and resumed.history == plain.losses


_KILLED_RUN = """
import sys
from torchgraft.models.llama import build_llama
from torchgraft.train import TrainConfig, train
config = TrainConfig(steps=10_000, batch_size=2, seq_len=16, lr=3e-3, warmup_steps=0,
                     min_lr_ratio=1.0, checkpoint_every=1, checkpoint_dir=sys.argv[1],
                     progress=False)
train(build_llama("tiny", with_loss=True), config)
"""


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(directory)], env=env)
    try:
        deadline = time.monotonic() + 120
        caught = False
        while time.monotonic() < deadline and process.poll() is None:
            names = os.listdir(directory) if directory.is_dir() else []
            if "step-3" in names and any(n.endswith(".partial") for n in names):
                process.send_signal(signal.SIGKILL)
                caught = True
                break
        assert caught, "the run never reached a save"
    finally:
        process.kill()
        process.wait()
    complete = [p for p in directory.iterdir() if p.name.startswith("step-")]
    last = max(int(p.name.split("-")[1]) for p in complete)
    with pytest.warns(CheckpointWarning):
        resumed = train(
            model(seed=5),
            tiny(steps=last + 1, checkpoint_every=1, checkpoint_dir=directory, resume=True),
        )
    plain = train(model(), tiny(steps=last + 1))
    assert resumed.start_step == last and resumed.history == plain.losses


RUN_CONFIG = """
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {{preset: tiny, with_loss: true}}
  inputs:
    - {{shape: [2, 16], dtype: int64, high: 256}}
    - {{shape: [2, 16], dtype: int64, high: 256}}
handlers: [float8]
train: {{steps: 2, batch_size: 2, seq_len: 16, warmup_steps: 0, checkpoint_every: 1,
         checkpoint_dir: {ckpt}, resume: true, compare_baseline: true, progress: false}}
output: {{dir: {out}}}
"""


def test_baseline_keeps_its_own_checkpoints_and_a_finished_rerun_keeps_metrics(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(ckpt=ckpt, out=out))
    assert cli.main(["run", str(config)]) == 0, capsys.readouterr().err
    metrics_text = (out / "metrics.json").read_text()
    metrics = json.loads(metrics_text)
    assert metrics["status"] == "finished" and len(metrics["losses"]) == 2
    converted = read_manifest(ckpt / "step-2")
    baseline = read_manifest(ckpt / "baseline" / "step-2")
    assert converted["run_id"] != baseline["run_id"]
    assert converted["losses"] == metrics["losses"]
    assert baseline["losses"] == metrics["baseline_losses"]
    capsys.readouterr()
    assert cli.main(["run", str(config)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "metrics.json").read_text() == metrics_text
