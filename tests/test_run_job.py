"""`torchgraft run`: the main job end to end, its outputs, overrides and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from torchgraft import cli
from torchgraft.config import load_config
from torchgraft.train.strict_json import dumps_strict

TINY = """
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {{preset: tiny, with_loss: true}}
  inputs:
    - {{shape: [{batch}, 32], dtype: int64, high: 256}}
    - {{shape: [{batch}, 32], dtype: int64, high: 256}}
handlers:
  - float8
  - flex_attention
  - chunked_cross_entropy: {{chunk_size: 32}}
train: {{steps: 50, batch_size: 4, seq_len: 32, lr: 3.0e-3, warmup_steps: 1,
         compare_baseline: {baseline}, progress: false}}
compile: {{enabled: {compiled}}}
output: {{dir: {out}}}
"""


def write_config(
    tmp_path: Path, *, batch: int = 4, baseline: bool = True, compiled: bool = False
) -> Path:
    path = tmp_path / "run.yaml"
    text = TINY.format(
        batch=batch,
        baseline=str(baseline).lower(),
        compiled=str(compiled).lower(),
        out=tmp_path / "from_config",
    )
    path.write_text(text)
    return path


def _refuse_constant(name: str) -> None:
    raise ValueError(f"metrics.json is not strict JSON: it contains {name}")


def test_run_writes_metrics_and_loss_plot(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        ["run", str(write_config(tmp_path)), "--steps", "4", "--out", str(out), "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    # strict JSON, as JSON.parse reads it: NaN / Infinity are refused
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_refuse_constant)
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    assert all(isinstance(x, float) and math.isfinite(x) for x in metrics["losses"])
    # applied order: chunked_cross_entropy declares that it runs before float8
    assert metrics["handlers"] == [
        {"name": "flex_attention", "matches": 2},
        {"name": "chunked_cross_entropy", "matches": 1},
        {"name": "float8", "matches": 14},
    ]
    assert metrics["tokens_per_s"] > 0 and len(metrics["baseline_losses"]) == 4
    float8 = {s["handler"]: s for s in metrics["sqnr_db"]}["float8"]  # calibrated alone
    assert float8["declared_db"] == 12.0 and float8["op_tolerance_db"] == 15.0
    assert float8["op_db"] >= 15.0 and float8["tolerance_db"] <= 12.0
    assert float8["tolerance_db"] <= float8["calibrated_db"] - 3.0 or float8["tolerance_db"] == 12.0
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (840, 720)  # two panels: the curves, and converted - baseline
    assert not (tmp_path / "from_config").exists()  # --out overrides output.dir
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "float8" in printed


def test_run_rejects_a_batch_shape_said_twice_differently(tmp_path, capsys):
    code = cli.main(["run", str(write_config(tmp_path, batch=2)), "--steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "run.yaml:12:32: train.batch_size is 4 but model.inputs[0] has shape" in err
    assert "[2, 32] (at " in err and "run.yaml:6:" in err and "Traceback" not in err


def test_run_with_compile(tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path, baseline=False, compiled=True)
    assert cli.main(["run", str(config), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compiled"] is True and len(metrics["losses"]) == 2
    assert metrics["losses"][1] < metrics["losses"][0]


def test_default_config_runs(tmp_path, capsys):
    config = load_config(cli.DEFAULT_CONFIG)
    assert [entry.name for entry in config.handlers] == ["float8", "flex_attention"]
    assert config.train.compare_baseline
    out = tmp_path / "default"
    assert cli.main(["run", "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {h["name"]: h["matches"] for h in metrics["handlers"]} == {
        "float8": 42,
        "flex_attention": 6,
    }


def test_transformers_llama_runs_with_float8_and_chunked_loss(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = Path(cli.__file__).parent / "configs" / "hf_llama_float8.yaml"
    out = tmp_path / "hf"
    assert cli.main(["run", str(config), "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {h["name"]: h["matches"] for h in metrics["handlers"]} == {
        "chunked_cross_entropy": 1,
        "float8": 14,
    }


def test_metrics_json_names_what_was_not_finite():
    text = dumps_strict(
        {
            "losses": [2.5, math.nan, 2.25],
            "sqnr_db": [{"step_db": math.inf, "total_db": -math.inf, "tolerance_db": -math.inf}],
            "tokens_per_s": 10.0,
        }
    )
    data = json.loads(text, parse_constant=_refuse_constant)
    assert data["losses"] == [2.5, None, 2.25]
    assert data["losses_why"] == "entries [1] are null: not finite (nan)"
    exact = data["sqnr_db"][0]
    assert exact["step_db"] is None and "exact" in exact["step_db_why"]
    assert exact["total_db"] is None and "zeros" in exact["total_db_why"]
    assert exact["tolerance_db"] is None and "no tolerance" in exact["tolerance_db_why"]
    assert data["tokens_per_s"] == 10.0 and "tokens_per_s_why" not in data
