"""Faults during training end the job with a record and one line: the non-finite limit
writes metrics.json (status nonfinite) and exits 3; under torchrun, a stopped rank ends the
job within the collective timeout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from torchgraft import cli

TINY = """
model:
  factory: "{factory}"
  kwargs: {{preset: tiny, with_loss: true}}
  inputs:
    - {{shape: [2, 16], dtype: int64, high: 256}}
    - {{shape: [2, 16], dtype: int64, high: 256}}
handlers: []
verify: false
parallel: {parallel}
train: {{steps: {steps}, batch_size: 2, seq_len: 16, lr: {lr}, warmup_steps: 0,
         max_nonfinite_in_a_row: 2, progress: false{extra}}}
output: {{dir: {out}}}
"""


def test_nonfinite_limit_writes_metrics_and_exits_3(tmp_path, capfd):
    config = tmp_path / "run.yaml"  # lr 1e30: the first update makes every later loss inf/nan
    config.write_text(
        TINY.format(
            factory="torchgraft.models:build_llama", parallel="{}", steps=10, lr="1.0e+30",
            extra="", out=tmp_path / "out",
        )
    )  # fmt: skip
    code = cli.main(["run", str(config)])
    out, err = capfd.readouterr()
    assert code == cli.EXIT_TRAINING_STOPPED, err
    assert err.count("\n") == 1 and "Traceback" not in err and "non-finite" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "nonfinite"
    assert metrics["steps"] == 1 and len(metrics["losses"]) == 3  # 1 applied, 2 skipped


PID_MODULE = """
import os
from pathlib import Path

from torchgraft.models import build_llama


def build(**kwargs):
    Path(os.environ["TG_PIDS"], os.environ["RANK"]).write_text(str(os.getpid()))
    return build_llama(**kwargs)
"""

TIMEOUT_S = 10


@pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP and torchrun on Linux")
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    (tmp_path / "tg_pid_model.py").write_text(PID_MODULE)
    pids = tmp_path / "pids"
    pids.mkdir()
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "run.yaml"
    config.write_text(
        TINY.format(
            factory="tg_pid_model:build",
            parallel=f"{{tp: 2, init_timeout_s: {TIMEOUT_S}, train_timeout_s: {TIMEOUT_S}}}",
            steps=100_000, lr="1.0e-3", out=tmp_path / "out",
            extra=f", checkpoint_dir: {ckpt}, checkpoint_every: 1",
        )
    )  # fmt: skip
    env = {**os.environ, "TG_PIDS": str(pids), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", "-m", "torchgraft", "run", str(config), "--no-progress"]
    job = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []  # (arrival time, line) of the job's output
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), x) for x in job.stdout)
    )
    reader.start()
    stopped = None
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "step-2").exists():  # both ranks train
            assert job.poll() is None and time.monotonic() < deadline, "".join(x for _, x in lines)
            time.sleep(0.2)
        stopped = int((pids / "1").read_text())
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        job.wait(timeout=TIMEOUT_S + 90)
        elapsed = time.monotonic() - start
        reader.join()
    finally:
        if stopped is not None:
            with _ignore_missing():
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
        job.kill()
        job.wait()
    output = "".join(x for _, x in lines)
    named = f"error: rank 0 of 2: rank 1 of 2 (pid {stopped} on this host) has not responded"
    reports = [t - start for t, x in lines if named in x]
    assert job.returncode != 0 and reports, output
    # rank 0's heartbeat watch names the stopped rank once it has been silent for the
    # timeout (plus a beat or two) and ends it, so the job ends within the timeout: it
    # does not wait out torchrun's 30 s SIGTERM grace, which a stopped process ignores.
    assert reports[0] < TIMEOUT_S + 5, output
    assert elapsed < TIMEOUT_S + 15, output


def _ignore_missing():
    return contextlib.suppress(ProcessLookupError)
