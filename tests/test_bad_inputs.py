"""Every bad input of ``torchgraft`` gives exit 2 and one line naming the key (and
``file:line:col`` where it was written), with no traceback, no debris, and no work done
first (the model factory is never called for a mistake it could not cause).

The table runs the CLI in-process (``cli.main``); two cases also run as real processes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchgraft import cli
from torchgraft.config import load_config

MARKER_MODULE = """
import os
from pathlib import Path

import torch
from torch import nn

from torchgraft.models.llama import build_llama


def build(**kwargs):
    Path(os.environ["TG_MARKER"]).touch()
    return build_llama("tiny", with_loss=True)


def exits(**kwargs):
    raise SystemExit(3)


class Quoted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = build_llama("tiny", with_loss=True)
        self.add_module('a"b', nn.Linear(4, 4))

    def forward(self, tokens, labels):
        extra = getattr(self, 'a"b')(torch.ones(4)).sum()
        return self.inner(tokens, labels) + 0 * extra


def quoted(**kwargs):
    return Quoted()


def linear(**kwargs):
    return nn.Linear(16, 16)
"""

SECTIONS = {
    "model": '{factory: "tg_marker_model:build", kwargs: {}, inputs: [{shape: [2, 16], '
    "dtype: int64, high: 256}, {shape: [2, 16], dtype: int64, high: 256}]}",
    "handlers": "[]",
    "verify": "false",
    "train": "{steps: 1, batch_size: 2, seq_len: 16, progress: false}",
    "output": "{dir: OUT}",
}


def config_text(**sections: str | None) -> str:
    """A run config: the base sections, each replaced (or dropped with None) as given."""
    merged = {**SECTIONS, **sections}
    return "".join(f"{k}: {v}\n" for k, v in merged.items() if v is not None)


def train(**fields: str) -> str:
    base = {"steps": "1", "batch_size": "2", "seq_len": "16", "progress": "false", **fields}
    return "{" + ", ".join(f"{k}: {v}" for k, v in base.items()) + "}"


def model(**fields: str) -> str:
    base = {
        "factory": '"tg_marker_model:build"',
        "kwargs": "{}",
        "inputs": "[{shape: [2, 16], dtype: int64, high: 256}, {shape: [2, 16], dtype: int64, "
        "high: 256}]",
        **fields,
    }
    return "{" + ", ".join(f"{k}: {v}" for k, v in base.items()) + "}"


def inputs(first: str) -> str:
    return model(inputs=f"[{first}, {{shape: [2, 16], dtype: int64, high: 256}}]")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def alias_bomb(levels: int = 9) -> str:
    """A ~300-byte YAML list whose last item expands to 9**levels strings."""
    items = ["&a0 [" + ", ".join(["x"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    text: str | None
    """The config (``None``: the base config); ``OUT`` / ``TMP`` are replaced by paths."""
    key: str
    """What the one line must name (a config key, a flag, a file)."""
    argv: tuple[str, ...] = ()
    """Extra arguments after the config (``TMP`` replaced); ``command`` is the subcommand."""
    command: str = "run"
    located: bool = True
    """The message gives ``file:line:col`` (false for command-line arguments)."""
    builds_model: bool = False
    """The mistake shows only in the model the factory builds."""
    setup: str = ""
    """A fixture to prepare in TMP: ``file``, ``dir``, ``empty``, ``short``, ``used``."""


C = Case
CASES = [
    # --- the file and YAML itself
    C("empty-file", "", "config is empty", located=False),
    C("invalid-yaml", "model: {factory: [\n", "invalid YAML"),
    C("top-level-list", "- 1\n- 2\n", "the config"),
    C("unknown-top-key", config_text(modle="{}"), "modle"),
    C("python-tag", config_text(verify="!!python/object/apply:os.system [ls]"), "verify"),
    C("duplicate-key", config_text() + "verify: true\n", "verify"),
    C("non-string-key-train", config_text(train="{1: 2}"), "train"),
    C("sequence-key-train", config_text(train="{[a, b]: 2}"), "train"),
    C("non-utf8", None, "cannot read", setup="latin1", located=False),
    C("deep-nesting-kwargs", config_text(model=model(kwargs=f"{{x: {nested(10_000)}}}")), "deep"),
    C(
        "alias-bomb-kwargs",
        config_text(model=model(kwargs=f"{{x: {alias_bomb()}}}")),
        "model.kwargs",
    ),
    C(
        "alias-bomb-option",
        config_text(handlers=f"[{{float8: {{skip_fqns: {alias_bomb()}}}}}]"),
        "handlers[0]",
    ),
    # --- imports
    C("imports-not-list", config_text(imports="5"), "imports"),
    C("imports-item-int", config_text(imports="[5]"), "imports[0]"),
    C("imports-missing", config_text(imports="[tg_no_such_module_xyz]"), "imports[0]"),
    # --- model
    C("model-missing", config_text(model=None), "model"),
    C("model-not-mapping", config_text(model="5"), "model"),
    C("factory-missing", config_text(model="{kwargs: {}}"), "factory"),
    C("factory-no-colon", config_text(model=model(factory='"nocolon"')), "factory"),
    C("factory-int", config_text(model=model(factory="5")), "model.factory"),
    C("factory-no-attr", config_text(model=model(factory='"tg_marker_model:nope"')), "factory"),
    C("factory-no-module", config_text(model=model(factory='"tg_nomod_xyz:f"')), "factory"),
    C(
        "factory-not-callable",
        config_text(model=model(factory='"torchgraft.models.llama:PRESETS"')),
        "factory",
    ),
    C("factory-not-module", config_text(model=model(factory='"builtins:dict"')), "factory"),
    C(
        "factory-raises",
        config_text(
            model=model(factory='"torchgraft.models:build_llama"', kwargs="{preset: nope}")
        ),
        "factory",
        builds_model=True,
    ),
    C(
        "factory-system-exit",
        config_text(model=model(factory='"tg_marker_model:exits"')),
        "factory",
        builds_model=True,
    ),
    C("kwargs-list", config_text(model=model(kwargs="[1, 2]")), "model.kwargs"),
    C("kwargs-int-key", config_text(model=model(kwargs="{1: 2}")), "model.kwargs"),
    C("inputs-not-list", config_text(model=model(inputs="5")), "model.inputs"),
    C("input-no-shape", config_text(model=inputs("{dtype: int64, high: 256}")), "shape"),
    C(
        "input-negative-dim",
        config_text(model=inputs("{shape: [-1, 16], dtype: int64, high: 256}")),
        "shape",
    ),
    C("input-shape-str", config_text(model=inputs("{shape: a, dtype: int64, high: 256}")), "shape"),
    C("input-bad-dtype", config_text(model=inputs("{shape: [2, 16], dtype: floaty}")), "dtype"),
    C("input-int-no-high", config_text(model=inputs("{shape: [2, 16], dtype: int64}")), "high"),
    C(
        "input-high-negative",
        config_text(model=inputs("{shape: [2, 16], dtype: int64, high: -1}")),
        "high",
    ),
    C(
        "input-huge",
        config_text(model=inputs("{shape: [1000000, 1000000], dtype: float32}")),
        "shape",
    ),
    C(
        "input-unknown-key",
        config_text(model=inputs("{shape: [2, 16], dtype: int64, high: 256, hi: 1}")),
        "hi",
    ),
    C(
        "inputs-not-the-batch",
        config_text(model=inputs("{shape: [3, 16], dtype: int64, high: 256}")),
        "model.inputs",
    ),
    C(
        "submodule-quote",
        config_text(model=model(factory='"tg_marker_model:quoted"')),
        "model",
        builds_model=True,
    ),
    C(
        "check-input-shape-mismatch",
        config_text(
            model=model(factory='"tg_marker_model:linear"', inputs="[{shape: [2, 8]}]"),
            handlers="[float8]",
        ),
        "model",
        command="check",
        builds_model=True,
    ),
    C(
        "input-float-tokens",
        config_text(model=inputs("{shape: [2, 16], dtype: float32}")),
        "model",
        builds_model=True,
    ),
    # --- capture, handlers, verify, parallel, compile
    C("capture-method", config_text(capture="{method: trace}"), "capture.method"),
    C("capture-strict", config_text(capture="{strict: yes please}"), "capture.strict"),
    C(
        "capture-dynamic-batch",
        config_text(capture="{dynamic_batch: sometimes}"),
        "capture.dynamic_batch",
    ),
    C("capture-unknown", config_text(capture="{methd: export}"), "methd"),
    C("handlers-int", config_text(handlers="5"), "handlers"),
    C("handler-options-int", config_text(handlers="[{float8: 5}]"), "handlers[0]"),
    C("handler-two-keys", config_text(handlers="[{float8: {}, int8: {}}]"), "handlers[0]"),
    C("handler-optional-str", config_text(handlers="[{float8: {optional: maybe}}]"), "optional"),
    C("verify-str", config_text(verify="maybe"), "verify"),
    C("allow-unknown-kind", config_text(allow="[overlapp]"), "allow"),
    C("allow-int", config_text(allow="5"), "allow"),
    C("allow-unacceptable", config_text(allow="[bad_option]"), "allow"),
    C("parallel-tp-zero", config_text(parallel="{tp: 0}"), "tp"),
    C("parallel-tp-str", config_text(parallel="{tp: two}"), "parallel.tp"),
    C("parallel-fsdp-negative", config_text(parallel="{fsdp: -1}"), "fsdp"),
    C("parallel-plan-list", config_text(parallel="{plan: [1]}"), "parallel.plan"),
    C("parallel-plan-value", config_text(parallel="{plan: {a: 5}}"), "parallel.plan"),
    C("parallel-sp-int", config_text(parallel="{sequence_parallel: 3}"), "sequence_parallel"),
    C("parallel-without-torchrun", config_text(parallel="{tp: 2}"), "parallel"),
    C("parallel-train-timeout", config_text(parallel="{train_timeout_s: 0}"), "train_timeout_s"),
    C("parallel-init-timeout", config_text(parallel="{init_timeout_s: -1}"), "init_timeout_s"),
    C("compile-int", config_text(compile="{enabled: 3}"), "compile.enabled"),
    # --- train
    C("steps-zero", config_text(train=train(steps="0")), "steps"),
    C("steps-negative", config_text(train=train(steps="-1")), "steps"),
    C("steps-str", config_text(train=train(steps="ten")), "train.steps"),
    C("steps-float", config_text(train=train(steps="1.5")), "train.steps"),
    C("batch-size-zero", config_text(train=train(batch_size="0")), "batch_size"),
    C("seq-len-zero", config_text(train=train(seq_len="0")), "seq_len"),
    C("lr-negative", config_text(train=train(lr="-1.0")), "lr"),
    C("lr-nan", config_text(train=train(lr=".nan")), "lr"),
    C("lr-inf", config_text(train=train(lr=".inf")), "lr"),
    C("lr-str", config_text(train=train(lr="fast")), "train.lr"),
    C("min-lr-ratio", config_text(train=train(min_lr_ratio="2")), "min_lr_ratio"),
    C("warmup-negative", config_text(train=train(warmup_steps="-1")), "warmup_steps"),
    C("weight-decay-negative", config_text(train=train(weight_decay="-0.5")), "weight_decay"),
    C("betas-out-of-range", config_text(train=train(betas="[2.0, 3.0]")), "betas"),
    C("betas-one-item", config_text(train=train(betas="[0.9]")), "betas"),
    C("grad-clip-zero", config_text(train=train(grad_clip="0")), "grad_clip"),
    C("seed-huge", config_text(train=train(seed=str(2**70))), "seed"),
    C("seed-negative", config_text(train=train(seed="-1")), "seed"),
    C(
        "max-nonfinite-zero",
        config_text(train=train(max_nonfinite_in_a_row="0")),
        "max_nonfinite_in_a_row",
    ),
    C("checkpoint-every-zero", config_text(train=train(checkpoint_every="0")), "checkpoint_every"),
    C("checkpoint-dir-int", config_text(train=train(checkpoint_dir="5")), "checkpoint_dir"),
    C(
        "checkpoint-dir-file",
        config_text(train=train(checkpoint_dir="TMP/file")),
        "checkpoint_dir",
        setup="file",
    ),
    C(
        "checkpoint-dir-used",
        config_text(train=train(checkpoint_dir="TMP/used")),
        "checkpoint_dir",
        setup="used",
    ),
    C("resume-without-dir", config_text(train=train(resume="true")), "resume"),
    C("resume-str", config_text(train=train(resume="maybe")), "train.resume"),
    C("data-path-missing", config_text(train=train(data_path="TMP/nothing.txt")), "data_path"),
    C(
        "data-path-empty",
        config_text(train=train(data_path="TMP/empty.txt")),
        "data_path",
        setup="empty",
    ),
    C(
        "data-path-short",
        config_text(train=train(data_path="TMP/short.txt")),
        "data_path",
        setup="short",
    ),
    C("data-path-dir", config_text(train=train(data_path="TMP/dir")), "data_path", setup="dir"),
    C("progress-int", config_text(train=train(progress="5")), "train.progress"),
    C(
        "compare-baseline-int",
        config_text(train=train(compare_baseline="5")),
        "train.compare_baseline",
    ),
    C("train-unknown-key", config_text(train=train(stepz="1")), "stepz"),
    # --- output and command-line paths
    C("output-dir-int", config_text(output="{dir: 5}"), "output.dir"),
    C("output-dir-file", config_text(output="{dir: TMP/file}"), "output.dir", setup="file"),
    C(
        "output-dir-under-file",
        config_text(output="{dir: TMP/file/sub}"),
        "output.dir",
        setup="file",
    ),
    C("out-flag-file", None, "--out", ("--out", "TMP/file"), located=False, setup="file"),
    C("out-flag-under-file", None, "--out", ("--out", "TMP/file/x"), located=False, setup="file"),
    C("dump-ir-file", None, "--dump-ir", ("--dump-ir", "TMP/file"), located=False, setup="file"),
    C(
        "write-expect-dir",
        None,
        "--write-expect",
        ("--write-expect", "TMP/dir"),
        "check",
        located=False,
        setup="dir",
    ),
    C(
        "expect-missing",
        None,
        "nothing.yaml",
        ("--expect", "TMP/nothing.yaml"),
        "check",
        located=False,
    ),
    C("viz-out-file", None, "--out", ("--out", "TMP/file"), "viz", located=False, setup="file"),
    C("viz-without-dot", None, "dot", ("--out", "TMP/viz"), "viz", located=False, setup="nodot"),
    C("config-missing", None, "no such config file", located=False, setup="noconfig"),
    C("config-is-dir", None, "cannot read", located=False, setup="configdir"),
]


@dataclasses.dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    traceback: bool
    seconds: float


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> Outcome:
    start = time.perf_counter()
    escaped = False
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse, or an exit the CLI let through
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - any escape is a traceback for the user
        code, escaped = None, True
    seconds = time.perf_counter() - start
    out, err = capfd.readouterr()
    return Outcome(code, out, err, escaped or "Traceback" in out + err, seconds)


def prepare(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Write the case's config and fixtures into ``tmp``; returns the argv."""
    (tmp / "tg_marker_model.py").write_text(MARKER_MODULE)
    monkeypatch.setenv("TG_MARKER", str(tmp / "factory-called"))
    (tmp / "file").write_text("not a directory\n")
    if case.setup == "dir":
        (tmp / "dir").mkdir()
    if case.setup == "empty":
        (tmp / "empty.txt").write_text("")
    if case.setup == "short":
        (tmp / "short.txt").write_text("too short")
    if case.setup == "used":
        (tmp / "used" / "step-3").mkdir(parents=True)
    if case.setup == "nodot":
        (tmp / "bin").mkdir()
        monkeypatch.setenv("PATH", str(tmp / "bin"))
    config = tmp / "run.yaml"
    text = config_text() if case.text is None else case.text
    config.write_text(text.replace("OUT", str(tmp / "out")).replace("TMP", str(tmp)))
    if case.setup == "latin1":
        config.write_bytes(config_text().encode() + b"# caf\xe9\n")
    if case.setup == "noconfig":
        config.unlink()
    if case.setup == "configdir":
        config.unlink()
        config.mkdir()
    argv = [case.command, str(config), *(a.replace("TMP", str(tmp)) for a in case.argv)]
    if case.command == "run":
        argv.append("--no-progress")
    return argv


def debris(case: Case, tmp: Path) -> list[str]:
    """Paths a failed command must not leave behind."""
    expected = {"tg_marker_model.py", "file", "run.yaml", "__pycache__", "dir", "bin"}
    expected |= {"empty.txt", "short.txt", "used"}
    if case.builds_model:
        expected.add("factory-called")
    return sorted(p.name for p in tmp.iterdir() if p.name not in expected)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line(case, tmp_path, monkeypatch, capfd):
    argv = prepare(case, tmp_path, monkeypatch)
    outcome = run_cli(argv, capfd)
    assert not outcome.traceback, outcome.out + outcome.err
    assert outcome.code == 2, outcome.out + outcome.err
    lines = outcome.err.strip().splitlines()
    assert len(lines) == 1, outcome.err
    assert case.key in lines[0], lines[0]
    if case.located:
        assert re.search(r"run\.yaml:\d+:\d+", lines[0]), lines[0]
    assert len(lines[0]) < 1000, lines[0][:200]
    assert debris(case, tmp_path) == [], lines[0]
    if case.id.startswith(("alias-bomb", "deep-nesting")):
        assert outcome.seconds < 1.0


def test_the_table_covers_every_config_key():
    """Each key of every section has a bad-value case naming it."""
    import typing

    from torchgraft.config import Config
    from torchgraft.passes import HandlerEntry

    named = " ".join(c.key + " " + (c.text or "") for c in CASES)
    missing = []

    def walk(cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.metadata.get("internal"):
                continue
            if field.name not in named:
                missing.append(f"{cls.__name__}.{field.name}")
            inner = typing.get_args(hints[field.name]) or (hints[field.name],)
            for tp in inner:
                if dataclasses.is_dataclass(tp) and tp is not HandlerEntry:
                    walk(tp)

    walk(Config)
    assert missing == []


def test_yaml_merge_keys_are_accepted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        config_text(
            model=model(kwargs="{<<: &shape {steps: 3, batch_size: 2}, preset: tiny}"),
            train="{<<: *shape, seq_len: 16, progress: false}",
        )
    )
    config = load_config(path)
    assert (config.train.steps, config.train.batch_size, config.train.seq_len) == (3, 2, 16)
    assert config.model.kwargs == {"steps": 3, "batch_size": 2, "preset": "tiny"}


@pytest.mark.parametrize("case_id", ["check-input-shape-mismatch", "factory-system-exit"])
def test_bad_input_in_a_real_process(case_id, tmp_path, monkeypatch):
    (case,) = [c for c in CASES if c.id == case_id]
    argv = prepare(case, tmp_path, monkeypatch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "torchgraft", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert case.key in result.stderr
