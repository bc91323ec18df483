"""`torchgraft run` and `check` with handlers at every stage: metrics list the stages and
their matches; unsupported stage combinations are refused naming handler and config key."""

from __future__ import annotations

import json

import pytest

from torchgraft import cli
from torchgraft.config import ConfigError, parse_config
from torchgraft.train.job import run_job

CONFIG = """
imports: [stage_handlers]
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {{preset: tiny, with_loss: true}}
  inputs:
    - {{shape: [2, 32], dtype: int64, high: 256}}
    - {{shape: [2, 32], dtype: int64, high: 256}}
handlers:
{handlers}
verify: false
parallel: {parallel}
train: {{steps: 3, batch_size: 2, seq_len: 32, lr: 3.0e-3, warmup_steps: 1, progress: false}}
output: {{dir: {out}}}
"""

HANDLERS = """  - selective_recompute
  - lora: {targets: ["*.attention.w?"], rank: 4}
  - muon
  - wsd: {warmup_steps: 1}
  - flex_attention
"""


def config(tmp_path, handlers: str = HANDLERS, parallel: str = "{tp: 1}"):
    text = CONFIG.format(handlers=handlers, parallel=parallel, out=tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_run_reports_every_stage(tmp_path, capsys):
    dump = tmp_path / "ir"
    code = cli.main(["run", str(config(tmp_path)), "--no-progress", "--dump-ir", str(dump)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stages"] == {
        "module": ["lora"],
        "graph": ["muon", "wsd", "flex_attention"],
        "joint": ["selective_recompute"],
    }
    matches = metrics["stage_matches"]
    assert matches["module"] == {"lora": 8} and matches["graph"]["flex_attention"] == 2
    assert matches["joint"]["selective_recompute"] > 50  # counted when the step was traced
    assert [h["name"] for h in metrics["handlers"]][0] == "lora"
    assert len(metrics["losses"]) == 3 and "compile" not in metrics
    backward = (dump / "joint_backward.py").read_text()
    assert "silu_backward" in backward and "def forward" in (dump / "joint_forward.py").read_text()


def test_unsupported_stage_combinations_are_refused(tmp_path):
    path = config(tmp_path, parallel="{fsdp: true}")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+:\d+: handler\(s\) 'selective_recompute'"):
        run_job(parse_config(path.read_text(), path))
    path = config(tmp_path, handlers="  - t_compile_relu\n")
    with pytest.raises(ConfigError, match="stage 'compile'.*compile.enabled is false"):
        run_job(parse_config(path.read_text(), path))


def test_check_traces_the_joint_stage(tmp_path):
    path = config(tmp_path, handlers="  - selective_recompute\n  - t_joint_gelu_backward\n")
    result = parse_config(path.read_text(), path).check()
    assert [p.kind for p in result.problems] == ["no_match"]
    assert result.problems[0].handlers == ("t_joint_gelu_backward",)
    assert result.matches["selective_recompute"] > 50


def test_check_compiles_the_compile_stage(tmp_path):
    handlers = "  - onednn_matmul\n  - t_compile_mm_twin\n  - t_compile_relu\n"
    path = config(tmp_path, handlers=handlers)
    result = parse_config(path.read_text(), path).check()
    kinds = {(p.kind, p.handlers) for p in result.problems}
    assert ("overlap", ("onednn_matmul", "t_compile_mm_twin")) in kinds
    assert ("no_match", ("t_compile_relu",)) in kinds  # the Llama has no ReLU
    assert ("no_match", ("t_compile_mm_twin",)) in kinds  # onednn_matmul took every mm first
    # forward and backward graphs: 2 layers x 7 projections + head, and twice that
    assert result.report.stage_matches()["compile"]["onednn_matmul"] == 45
    assert "numerics" not in {p.kind for p in result.problems}


def test_run_compiles_the_compile_stage_and_dumps_its_graphs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache
    path = config(tmp_path, handlers="  - onednn_matmul\n")
    path.write_text(path.read_text() + "compile: {enabled: true}\n")
    dump = tmp_path / "ir"
    code = cli.main(["run", str(path), "--no-progress", "--steps", "2", "--dump-ir", str(dump)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stage_matches"] == {"compile": {"onednn_matmul": 45}}
    assert metrics["compile"]["cache_misses"] >= 2  # forward and backward compiled
    for graph in ("compile_forward", "compile_backward"):
        diff = (dump / graph / "01_onednn_matmul.diff").read_text()
        assert "+" in diff and "torchgraft.onednn_mm" in diff
