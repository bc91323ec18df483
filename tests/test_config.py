"""Run configs: the schema, locations in every error, building and capturing the model."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchgraft.config import Config, ConfigError, load_config, parse_config
from torchgraft.models import Llama
from torchgraft.passes import HandlerEntry
from torchgraft.train import TrainConfig

LLAMA = """\
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {preset: tiny}
  inputs:
    - {shape: [2, 32], dtype: int64, high: 256}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "run.yaml")


def test_full_config():
    config = parse(
        LLAMA
        + """\
imports: [passes_handlers]
capture: {method: symbolic_trace, strict: false}
handlers:
  - t_fuse_rms
  - t_low_precision: {dtype: float16, optional: true}
  - t_silu: ~
verify: false
parallel: {tp: 2, fsdp: true, plan: {"layers.*.attention.wq": colwise}}
compile: {enabled: true}
train: {steps: 3, lr: 1.0e-3, betas: [0.9, 0.99], grad_clip: null, compare_baseline: true}
output: {dir: out}
"""
    )
    assert config.imports == ("passes_handlers",)
    assert config.model.factory == "torchgraft.models:build_llama"
    assert config.model.kwargs == {"preset": "tiny"}
    (spec,) = config.model.inputs
    assert spec.shape == (2, 32) and spec.dtype == "int64" and spec.high == 256
    assert config.capture.method == "symbolic_trace" and config.verify is False
    assert config.handlers == (
        HandlerEntry("t_fuse_rms", source="run.yaml:9:5"),
        HandlerEntry(
            "t_low_precision",
            {"dtype": "float16"},
            optional=True,
            source="run.yaml:10:5",
            option_sources={"dtype": "run.yaml:10:23"},
        ),
        HandlerEntry("t_silu", source="run.yaml:11:5"),
    )
    assert config.parallel.tp == 2 and config.parallel.fsdp
    assert config.parallel.plan == {"layers.*.attention.wq": "colwise"}
    assert config.compile.enabled and config.output.dir == "out"
    assert config.train.compare_baseline and config.train.grad_clip is None
    train = config.train.to_train_config()
    assert type(train) is TrainConfig
    assert (train.steps, train.lr, train.betas) == (3, 1e-3, (0.9, 0.99))
    assert config.locations["model.factory"] == "run.yaml:2:12"
    assert config.locations["imports[0]"] == "run.yaml:6:11"


def test_defaults():
    config = parse(LLAMA)
    assert config.imports == () and config.handlers == () and config.verify is True
    assert config.capture.method == "export" and not config.compile.enabled
    assert config.parallel.tp == 1 and not config.parallel.fsdp
    # the batch shape is said once: train's defaults to model.inputs[0]'s [batch, seq]
    assert config.train.to_train_config() == TrainConfig(batch_size=2, seq_len=32)
    assert config.allow == () and not config.train.compare_baseline


@pytest.mark.parametrize(
    ("text", "location", "message"),
    [
        ("model: {factory: a:b}\nfoo: 1\n", "2:1", "unknown key 'foo' in the config"),
        ("model: {factory: a:b}\ntrain: {stepz: 1}\n", "2:9", "did you mean 'steps'?"),
        (
            "model: {factory: a:b}\ntrain: {steps: ten}\n",
            "2:16",
            "train.steps: expected int, got 'ten'",
        ),
        ("model: {factory: a:b}\ntrain: {steps: -1}\n", "2:16", "train.steps: must be >= 1"),
        ("model: {factory: a:b}\ntrain: {betas: [1]}\n", "2:16", "expected 2 items, got 1"),
        ("model: {factory: a:b}\nverify: maybe\n", "2:9", "verify: expected bool, got 'maybe'"),
        ("model: {factory: a:b}\ncapture: {method: jit}\n", "2:19", "'export' | 'symbolic_trace'"),
        ("model: {factory: a:b}\nimports: mod\n", "2:10", "imports: expected a list"),
        ("model: {factory: ab}\n", "1:8", "factory must be 'module:callable'"),
        ("model: {factory: a:b, inputs: [{shape: [2], dtype: int64}]}\n", "1:32", "need high >= 1"),
        (
            "model: {factory: a:b, inputs: [{shape: [2], dtype: f32}]}\n",
            "1:32",
            "unknown dtype 'f32'",
        ),
        ("model: {factory: a:b}\nhandlers: [[x]]\n", "2:12", "a handler is a name or"),
        (
            "model: {factory: a:b}\nhandlers: [{x: 1}]\n",
            "2:16",
            "options of handler 'x' must be a mapping",
        ),
        (
            "model: {factory: a:b}\nhandlers: [{x: {optional: 1}}]\n",
            "2:27",
            "optional: expected bool",
        ),
        ("model: {factory: a:b}\nallow: [no_match, overlapp]\n", "2:19", "'overlapp' is not a"),
        ("model: {factory: a:b}\nallow: [cycle]\n", "2:9", "'cycle' cannot be allowed"),
        (  # the batch shape said twice, differently: the error names both lines
            "model:\n  factory: a:b\n  inputs: [{shape: [4, 32], dtype: int64, high: 300}]\n"
            "train: {steps: 2, seq_len: 64}\n",
            "4:28",
            "train.seq_len is 64 but model.inputs[0] has shape [4, 32] (at run.yaml:3:20)",
        ),
        ("model: {factory: a:b}\nmodel: {factory: a:b}\n", "2:1", "key 'model' appears twice"),
        ("capture: {}\n", "1:1", "missing required key 'model'"),
        ("- 1\n", "1:1", "expected a mapping with keys imports, model"),
        ("model: {factory: a:b\n", "2:1", "invalid YAML"),
        ("model: {factory: a:b}\n  bad indent: 1\n", "2:3", "invalid YAML: expected <block end>"),
        (
            "model: {factory: a:b, kwargs: {x: !!python/object/apply:os.system [echo]}}\n",
            "1:35",
            "invalid YAML: could not determine a constructor for the tag",
        ),
    ],
)
def test_errors_give_file_line_and_column(text, location, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "run.yaml")
    assert str(info.value).startswith(f"run.yaml:{location}: "), str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the config is empty"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_imports_and_the_factory_are_resolved_with_locations(tmp_path):
    config = parse("imports: [json, no_such_module_xyz]\n" + LLAMA)
    with pytest.raises(
        ConfigError, match=r"run.yaml:1:17: imports\[1\]: cannot import 'no_such_module_xyz'"
    ):
        config.import_modules()
    bad_attr = parse(LLAMA.replace("build_llama", "build_alpaca"))
    with pytest.raises(
        ConfigError,
        match="run.yaml:2:12: model.factory: torchgraft.models has no attribute 'build_alpaca'",
    ):
        bad_attr.build_model()
    raising = parse(LLAMA.replace("preset: tiny", "preset: huge"))
    with pytest.raises(
        ConfigError,
        match=r"build_llama\(\*\*\{'preset': 'huge'\}\) raised ValueError: unknown Llama preset",
    ):
        raising.build_model()


def test_imports_find_modules_beside_the_config(tmp_path):
    name = f"beside_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n"
    )
    path = tmp_path / "run.yaml"
    path.write_text(
        f"imports: [{name}]\nmodel:\n  factory: '{name}:build'\n  inputs: [{{shape: [3, 4]}}]\n"
    )
    config = load_config(path)
    config.import_modules()
    model = config.build_model()
    (x,) = config.example_inputs()
    assert x.shape == (3, 4) and x.dtype == torch.float32
    assert model(x).shape == (3, 2)
    assert str(tmp_path) not in sys.path  # only while importing


def test_the_llama_factory_builds_and_captures():
    config = parse(LLAMA)
    model = config.build_model()
    assert isinstance(model, Llama)
    inputs = config.example_inputs()
    assert inputs[0].shape == (2, 32) and inputs[0].dtype == torch.int64
    assert int(inputs[0].min()) >= 0 and int(inputs[0].max()) < 256
    assert torch.equal(config.example_inputs()[0], inputs[0])  # seeded
    gm = config.capture_model(model, inputs)
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    no_inputs = parse("model: {factory: 'torchgraft.models:build_llama'}\n")
    with pytest.raises(ConfigError, match="model.inputs is empty"):
        no_inputs.example_inputs()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_example_configs_are_valid(path):
    config = load_config(path)
    assert config.model.inputs and config.handlers


def test_config_directory_does_not_shadow_installed_modules(tmp_path, monkeypatch):
    """A file next to the config with an installed module's name is not what the factory
    imports: the config's directory is searched last."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tg_shadowed.py").write_text("WHO = 'installed'\n")
    monkeypatch.syspath_prepend(str(site))
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "tg_shadowed.py").write_text("WHO = 'next to the config'\n")
    (folder / "tg_shadow_factory.py").write_text(
        "import torch\nimport tg_shadowed\n\n\ndef build():\n"
        "    assert tg_shadowed.WHO == 'installed', tg_shadowed.WHO\n"
        "    return torch.nn.Linear(2, 2)\n"
    )
    path = folder / "run.yaml"
    path.write_text('model: {factory: "tg_shadow_factory:build"}\n')
    for name in ("tg_shadowed", "tg_shadow_factory"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert isinstance(load_config(path).build_model(), torch.nn.Linear)
    finally:
        for name in ("tg_shadowed", "tg_shadow_factory"):
            sys.modules.pop(name, None)
