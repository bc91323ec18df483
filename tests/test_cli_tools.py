"""`torchgraft viz`, `explain` and `--dump-ir` wired to a config, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchgraft import cli

CONFIG = Path(cli.__file__).parent / "configs" / "llama_tiny_float8.yaml"


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="Graphviz dot is not installed")
def test_viz_writes_page_and_svgs(tmp_path, capsys):
    out = tmp_path / "viz"
    assert cli.main(["viz", str(CONFIG), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    assert "float8" in html and "flex_attention" in html and "chunked_cross_entropy" in html
    assert "cluster:model.layers.0" in (out / "before.svg").read_text()  # expanded by default


def test_explain_says_why_for_each_candidate(tmp_path, capsys):
    argv = ["explain", str(CONFIG), "--handler", "float8", "--module", "layers.0.attention.*"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "handler 'float8', rule 'linear'" in out and "4 rewritten" in out


def test_explain_unknown_handler_is_bad_input(capsys):
    assert cli.main(["explain", str(CONFIG), "--handler", "float9"]) == 2
    assert "float8" in capsys.readouterr().err  # names what the plan has


def test_check_dump_ir_writes_one_file_per_handler_and_diffs(tmp_path, capsys):
    out = tmp_path / "ir"
    assert cli.main(["check", str(CONFIG), "--dump-ir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == "00_captured.py"
    assert {"01_chunked_cross_entropy.py", "01_chunked_cross_entropy.diff"} <= set(names)
    assert (
        "torchgraft.chunked_linear_cross_entropy"
        in (out / "01_chunked_cross_entropy.diff").read_text()
    )


STAGE_CONFIG = """
imports: [stage_handlers]
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {{preset: tiny, with_loss: true}}
  inputs:
    - {{shape: [2, 16], dtype: int64, high: 256}}
    - {{shape: [2, 16], dtype: int64, high: 256}}
handlers:
{handlers}
compile: {{enabled: true}}
"""


def stage_config(tmp_path: Path, handlers: str) -> str:
    path = tmp_path / "stages.yaml"
    path.write_text(STAGE_CONFIG.format(handlers=handlers))
    return str(path)


def test_explain_defaults_to_the_handler_stage(tmp_path, capsys):
    path = stage_config(tmp_path, "  - t_joint_gelu_backward\n")
    assert cli.main(["explain", path, "--handler", "t_joint_gelu_backward"]) == 0
    out = capsys.readouterr().out
    assert "== joint graph (" in out  # the traced joint forward + backward graph
    assert "no node computes aten.gelu_backward.default" in out  # the tiny Llama uses SiLU
    assert (
        cli.main(["explain", path, "--handler", "t_joint_gelu_backward", "--stage", "graph"]) == 0
    )
    assert "== joint graph" not in capsys.readouterr().out


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="Graphviz dot is not installed")
def test_viz_and_dump_ir_of_the_compile_stage(tmp_path, capsys):
    path = stage_config(tmp_path, "  - onednn_matmul\n")
    out, ir = tmp_path / "viz", tmp_path / "ir"
    argv = ["viz", path, "--out", str(out), "--stage", "compile", "--dump-ir", str(ir)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    for graph in ("compile_forward", "compile_backward"):  # Inductor's post-grad graphs
        assert "onednn_matmul" in (out / graph / "index.html").read_text()
        diff = (ir / graph / "01_onednn_matmul.diff").read_text()
        assert "-" in diff and "torch.ops.torchgraft.onednn_mm.default" in diff
    backward = (ir / "compile_backward" / "00_captured.py").read_text()
    assert "tangents_1" in backward and "aten.mm.default" in backward
