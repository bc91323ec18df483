"""``torchgraft check`` / ``list``: exit codes, JSON, expectation files, and a bad-input
matrix that never shows a traceback."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torchgraft as tg
from torchgraft.cli import main
from torchgraft.passes.report import CheckResult, Report
from torchgraft.passes.verify import HandlerSqnr
from torchgraft.tools.plain_text import plain_text
from torchgraft.train.strict_json import dumps_strict

TESTS = Path(__file__).parent

MODEL = """\
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {preset: tiny}
  inputs:
    - {shape: [2, 32], dtype: int64, high: 256}
"""
CLEAN = "imports: [passes_handlers]\n" + MODEL + "handlers: [t_fuse_rms, t_silu]\n"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_config_exits_0_with_a_table(tmp_path, capsys):
    code, out, err = run(["check", write(tmp_path, CLEAN)], capsys)
    assert code == 0, err
    assert "order: t_fuse_rms -> t_silu" in out
    assert "t_fuse_rms" in out and "rms" in out and "no problems" in out
    assert out.rstrip().endswith("OK")


def test_json_output_is_exactly_the_documented_document(tmp_path, capsys):
    config = write(tmp_path, CLEAN.replace("t_silu]", "t_silu, t_relu]"))
    code, out, _ = run(["check", config, "--json"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert list(doc) == ["ok", "order", "matches", "problems", "allowed", "sqnr_db"]
    assert doc["ok"] is False
    assert doc["order"] == ["t_fuse_rms", "t_silu", "t_relu"]
    assert doc["matches"] == {"t_fuse_rms": 5, "t_silu": 2, "t_relu": 0}
    (problem,) = doc["problems"]
    assert list(problem) == ["kind", "handlers", "rule", "node", "source", "message"]
    assert problem["kind"] == "no_match" and problem["handlers"] == ["t_relu"]


def test_json_sqnr_of_an_exact_handler_is_strict_json():
    # An exact rewrite reads +inf dB, a handler that does not approximate has a -inf
    # tolerance: both become null with a reason, as in metrics.json.
    exact = HandlerSqnr("h", math.inf, math.inf, "output 0", -math.inf, alone_db=math.inf)
    report = Report(order=["h"], sqnr={"h": exact})
    text = dumps_strict(CheckResult(["h"], [], report=report).to_json())
    (entry,) = json.loads(text, parse_constant=pytest.fail)["sqnr_db"]
    assert entry["step_db"] is None and entry["step_db_why"].startswith("inf: no difference")
    assert entry["tolerance_db"] is None and "no tolerance" in entry["tolerance_db_why"]
    assert entry["handler"] == "h" and entry["worst"] == "output 0"


def test_problems_exit_1_with_readable_blocks(tmp_path, capsys):
    plan = "handlers: [t_matmul_back, t_linear_matmul]\n"
    code, out, _ = run(
        ["check", write(tmp_path, "imports: [passes_handlers]\n" + MODEL + plan)], capsys
    )
    assert code == 1
    assert "2 problems:" in out and "1. [order] t_matmul_back, t_linear_matmul" in out
    assert "    at " in out and "llama.py" in out
    assert out.rstrip().endswith("FAILED")


@pytest.mark.parametrize(
    ("text", "code", "expected"),
    [
        # unusable input: exit 2, one line on stderr with file:line:col
        ("model: {factory: 'a:b'\n", 2, "run.yaml:2:1: invalid YAML"),
        (
            MODEL + "handler: [t_silu]\n",
            2,
            "run.yaml:6:1: unknown key 'handler' in the config; did you mean 'handlers'?",
        ),
        (MODEL + "verify: sometimes\n", 2, "run.yaml:6:9: verify: expected bool, got 'sometimes'"),
        (MODEL + "train: {lr: fast}\n", 2, "run.yaml:6:13: train.lr: expected float, got 'fast'"),
        (
            "imports: [passes_handlers, no_such_mod]\n" + MODEL,
            2,
            "run.yaml:1:28: imports[1]: cannot import 'no_such_mod': ModuleNotFoundError",
        ),
        (
            MODEL.replace("tiny", "gigantic"),
            2,
            "model.factory: torchgraft.models:build_llama(**{'preset': 'gigantic'}) raised ValueError",
        ),
        # plan problems: exit 1, reported like every other problem
        (
            "imports: [passes_handlers]\n" + MODEL + "handlers: [t_silu, t_fuse_rsm]\n",
            1,
            "[unknown_handler] t_fuse_rsm",
        ),
        (
            "imports: [passes_handlers]\n"
            + MODEL
            + "handlers:\n  - t_low_precision: {dtype: int4}\n",
            1,
            "option 'dtype' must be 'bfloat16' | 'float16', got 'int4'\n    at ",
        ),
    ],
)
def test_bad_input_matrix(tmp_path, capsys, text, code, expected):
    config = write(tmp_path, text)
    got, out, err = run(["check", config], capsys)
    assert got == code
    assert "Traceback" not in out + err
    if code == 2:
        assert out == ""
        assert err.startswith("torchgraft check: error: ") and err.count("\n") == 1
        assert expected in err
    else:
        assert expected in out


def test_bad_option_points_at_its_config_line(tmp_path, capsys):
    text = (
        "imports: [passes_handlers]\n" + MODEL + "handlers:\n  - t_low_precision: {dtyp: float16}\n"
    )
    code, out, _ = run(["check", write(tmp_path, text), "--json"], capsys)
    assert code == 1
    (problem,) = json.loads(out)["problems"]
    assert problem["kind"] == "bad_option" and problem["source"].endswith("run.yaml:8:23")
    assert "did you mean 'dtype'?" in problem["message"]


def test_missing_config_and_missing_expectation_exit_2(tmp_path, capsys):
    code, _, err = run(["check", str(tmp_path / "absent.yaml")], capsys)
    assert code == 2 and "absent.yaml: no such config file" in err
    code, _, err = run(
        ["check", write(tmp_path, CLEAN), "--expect", str(tmp_path / "x.yaml")], capsys
    )
    assert code == 2 and "x.yaml: cannot read the expectation file" in err


def test_expectation_round_trip_and_diff(tmp_path, capsys):
    expect = str(tmp_path / "expect.yaml")
    config = write(tmp_path, CLEAN)
    assert run(["check", config, "--write-expect", expect], capsys)[0] == 0
    text = Path(expect).read_text()
    assert "order:\n- t_fuse_rms\n- t_silu\n" in text and "torchgraft.rms_norm.default: 5" in text
    assert run(["check", config, "--expect", expect], capsys)[0] == 0
    # a plan change alters what gets rewritten: exit 1 with one line per difference
    changed = write(tmp_path, CLEAN.replace("[t_fuse_rms, t_silu]", "[t_silu, t_linear_matmul]"))
    code, out, _ = run(["check", changed, "--expect", expect], capsys)
    assert code == 1
    assert "order: expected t_fuse_rms -> t_silu, got t_silu -> t_linear_matmul" in out
    assert "matches of t_fuse_rms.rms: expected 5, got (absent)" in out
    assert "matches of t_linear_matmul.linear: expected (absent), got 15" in out
    assert "aten.linear.default nodes after the run: expected 15, got 0" in out
    assert f"at {expect}" in out and "[expect]" in out


def test_list_shows_handlers(capsys):
    code, out, _ = run(["list", "--import", "passes_handlers"], capsys)
    assert code == 0
    assert "t_low_precision  (passes_handlers.TLowPrecision)" in out
    assert "    dtype: 'bfloat16' | 'float16' = 'bfloat16'\n        Dtype the GEMM runs in." in out
    assert "order: after t_linear_matmul" in out
    code, _, err = run(["list", "--import", "no_such_mod"], capsys)
    assert code == 2 and "cannot import 'no_such_mod'" in err


def test_list_prints_plain_text_not_restructuredtext(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0 and "float8  (torchgraft.handlers.float8.Float8)" in out
    for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
        assert markup not in out, markup
    assert "the FQN (see torchgraft.ir.provenance.module_glob)" in out
    assert max(len(line) for line in out.splitlines() if "(/" not in line) <= 90


def test_plain_text_drops_roles_literals_and_emphasis():
    doc = "Uses :func:`~a.b.c` and :class:`x.Y`, ``z = 1`` and *only* **this**.\n\n    code  kept"
    assert plain_text(doc) == "Uses c and x.Y, z = 1 and only this.\n\n    code  kept"


def test_testing_helpers(tmp_path):
    result = tg.testing.assert_config_clean(write(tmp_path, CLEAN))
    assert result.matches == {"t_fuse_rms": 5, "t_silu": 2}
    with pytest.raises(AssertionError, match=r"\[no_match\] t_relu"):
        tg.testing.assert_config_clean(write(tmp_path, CLEAN.replace("t_silu]", "t_relu]")))


def test_console_entry_points_run_in_a_real_process(tmp_path):
    """``python -m torchgraft`` in two processes at once: a clean check as JSON, and
    malformed YAML."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    configs = {
        "clean": write(tmp_path, CLEAN, "clean.yaml"),
        "yaml": write(tmp_path, "model: [unclosed\n", "yaml.yaml"),
    }
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "torchgraft", "check", path, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, path in configs.items()
    }
    results = {key: (p.wait(timeout=240), *p.communicate()) for key, p in procs.items()}
    code, out, err = results["clean"]
    assert code == 0, err
    doc = json.loads(out)
    sqnr = doc.pop("sqnr_db")
    assert doc == {
        "ok": True,
        "order": ["t_fuse_rms", "t_silu"],
        "matches": {"t_fuse_rms": 5, "t_silu": 2},
        "problems": [],
        "allowed": [],
    }
    # What verify measured, per handler in run order, with metrics.json's sqnr_db fields.
    assert [s["handler"] for s in sqnr] == ["t_fuse_rms", "t_silu"]
    for s in sqnr:
        assert list(s) == [f.name for f in dataclasses.fields(HandlerSqnr)]
        assert s["tolerance_db"] <= s["step_db"] < math.inf
        assert s["total_db"] >= s["tolerance_db"] and s["worst"]
    code, out, err = results["yaml"]
    assert code == 2 and out == "" and "Traceback" not in err
    assert err == "torchgraft check: error: " + configs["yaml"] + ":2:1: invalid YAML: " + (
        "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)\n"
    )


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage: torchgraft" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["check", "a.yaml", "--expect", "x", "--write-expect", "y"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
