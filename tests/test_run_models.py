"""`torchgraft run` trains models as their authors wrote them: logits models (a tensor, a
dict, a ``transformers`` ``ModelOutput``) get the next-token loss inside the captured graph,
the batch shape is said once, non-LM models are refused in one line, and run refuses what
check reports."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from hf_configs import qwen2_config

import torchgraft as tg
from torchgraft import cli
from torchgraft.config import parse_config
from torchgraft.models import build_llama
from torchgraft.train.lm import NextTokenLoss

CONFIGS = Path(cli.__file__).parent / "configs"

# Factories of models no one here wrapped, imported from beside the config.
FACTORIES = '''
import torch
from torch import nn
from torchgraft.models import build_llama


class DictLM(nn.Module):
    """forward(tokens) -> {"logits": ...}."""

    def __init__(self):
        super().__init__()
        self.lm = build_llama("tiny")

    def forward(self, tokens):
        return {"logits": self.lm(tokens), "aux": tokens.float().mean()}


class Bidirectional(nn.Module):
    """Logits of every position see the whole sequence (a BERT-like encoder)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.out = nn.Linear(16, 256)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.out(h + h.mean(dim=1, keepdim=True))


class Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 10)

    def forward(self, pixels):
        return self.proj(pixels.flatten(1))


class LogitsFromTwo(nn.Module):
    """forward(tokens, labels) that forgets to compute the loss."""

    def __init__(self):
        super().__init__()
        self.lm = build_llama("tiny")

    def forward(self, tokens, labels):
        return self.lm(tokens)


def dict_lm():
    torch.manual_seed(0)
    return DictLM()


def bidirectional():
    return Bidirectional()


def image():
    return Image()


def logits_from_two():
    return LogitsFromTwo()


def small_vocab():
    return build_llama("tiny", vocab_size=128)
'''


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "zoo_factories.py").write_text(FACTORIES)
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def run(path: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str, str, Path]:
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--out", str(out), "--no-progress", *extra])
    printed, err = capsys.readouterr()
    return code, printed, err, out


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def finite(losses: list[float]) -> bool:
    return all(isinstance(x, float) and math.isfinite(x) for x in losses)


def test_a_logits_model_passes_check_then_run_trains_at_the_inputs_batch(tmp_path, capsys):
    # the example of the issue: one [4, 32] token input, no train section
    path = write(
        tmp_path,
        """\
        model:
          factory: "torchgraft.models:build_llama"
          kwargs: {preset: tiny, vocab_size: 512}
          inputs: [{shape: [4, 32], dtype: int64, high: 300}]
        handlers:
          - chunked_cross_entropy: {chunk_size: 32}
          - float8
        """,
    )
    assert cli.main(["check", str(path)]) == 0, capsys.readouterr().out
    capsys.readouterr()
    code, printed, err, out = run(path, tmp_path, capsys, "--steps", "3")
    assert code == 0, err
    doc = metrics(out)
    assert (doc["batch_size"], doc["seq_len"], doc["steps"]) == (4, 32, 3)
    assert finite(doc["losses"]) and doc["losses"][0] > doc["losses"][-1]
    # the loss torchgraft added is in the graph: the chunked loss found projection + loss
    assert {h["name"]: h["matches"] for h in doc["handlers"]} == {
        "chunked_cross_entropy": 1,
        "float8": 14,
    }
    assert "trained 3 steps" in printed


def test_the_loss_wrapper_keeps_the_models_fqns_and_parameters():
    model = build_llama("tiny")
    wrapped = NextTokenLoss(model)
    names = [(n, p) for n, p in model.named_parameters()]
    assert [(n, id(p)) for n, p in wrapped.named_parameters()] == [(n, id(p)) for n, p in names]
    tokens = torch.randint(0, 256, (2, 16))
    labels = torch.randint(0, 256, (2, 16))
    gm = tg.capture(wrapped, (tokens, labels))
    assert all(a is b for (_, a), (_, b) in zip(gm.named_parameters(), names, strict=True))
    expected = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
    loss = gm(tokens, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.output.weight.grad is not None  # gradients reach the model's own parameters


def test_a_transformers_gpt2_trains_as_it_ships(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "gpt2"
    argv = ["run", str(CONFIGS / "hf_gpt2.yaml"), "--steps", "3", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    doc = metrics(out)
    assert (
        doc["steps"] == 3
        and finite(doc["losses"])
        and (doc["batch_size"], doc["seq_len"])
        == (
            4,
            64,
        )
    )
    assert {h["name"]: h["matches"] for h in doc["handlers"]} == {"chunked_cross_entropy": 1}


def test_a_transformers_qwen2_trains_with_float8_and_the_chunked_loss(tmp_path, capsys):
    pytest.importorskip("transformers")
    handlers = "handlers:\n  - chunked_cross_entropy: {chunk_size: 32}\n  - float8\n"
    path = write(tmp_path, qwen2_config(2, 32, handlers))
    code, _, err, out = run(path, tmp_path, capsys, "--steps", "3")
    assert code == 0, err
    doc = metrics(out)
    assert doc["steps"] == 3 and finite(doc["losses"])
    # q/k/v (with bias), o, gate, up, down per layer; the head is inside the chunked loss
    assert {h["name"]: h["matches"] for h in doc["handlers"]} == {
        "chunked_cross_entropy": 1,
        "float8": 14,
    }


def test_a_dict_of_logits_and_a_loss_model_without_inputs(tmp_path, capsys):
    path = write(
        tmp_path,
        """\
        imports: [zoo_factories]
        model: {factory: "zoo_factories:dict_lm", inputs: [{shape: [2, 16], dtype: int64, high: 256}]}
        handlers: [{chunked_cross_entropy: {chunk_size: 16}}]
        """,
    )
    code, _, err, out = run(path, tmp_path, capsys, "--steps", "2")
    assert code == 0, err
    assert finite(metrics(out)["losses"])
    # model.inputs omitted: (tokens, labels) of the train section, since forward takes both
    path = write(
        tmp_path,
        """\
        model: {factory: "torchgraft.models:build_llama", kwargs: {preset: tiny, with_loss: true}}
        handlers: [{chunked_cross_entropy: {chunk_size: 16}}]
        train: {batch_size: 2, seq_len: 16}
        """,
    )
    code, _, err, out = run(path, tmp_path, capsys, "--steps", "2")
    assert code == 0, err
    assert (metrics(out)["batch_size"], metrics(out)["seq_len"]) == (2, 16)


@pytest.mark.parametrize(
    ("factory", "inputs", "says"),
    [
        ("zoo_factories:image", "[{shape: [2, 3, 8, 8]}]", "model.inputs are float32 [2, 3, 8, 8]"),
        (
            "zoo_factories:bidirectional",
            "[{shape: [2, 16], dtype: int64, high: 256}]",
            "Bidirectional is not causal",
        ),
        (  # the training text is bytes: 256 ids
            "zoo_factories:small_vocab",
            "[{shape: [2, 16], dtype: int64, high: 128}]",
            "forward(tokens [1, 16]) returned logits of shape [1, 16, 128]",
        ),
        (
            "zoo_factories:logits_from_two",
            "[{shape: [2, 16], dtype: int64, high: 256}, {shape: [2, 16], dtype: int64, high: 256}]",
            "forward(tokens, labels) returned [2, 16, 256], not a scalar loss",
        ),
    ],
)
def test_models_run_cannot_train_are_refused_in_one_line(tmp_path, capsys, factory, inputs, says):
    path = write(
        tmp_path,
        f"""\
        imports: [zoo_factories]
        model: {{factory: "{factory}", inputs: {inputs}}}
        """,
    )
    code, _, err, out = run(path, tmp_path, capsys, "--steps", "1")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "run.yaml:" in err and says in err
    assert "torchgraft run trains causal language models" in err
    assert not out.exists()
    # check takes any model
    if "image" in factory:
        assert cli.main(["check", str(path)]) in (0, 1)


PLAN_WITH_PROBLEMS = """\
imports: [passes_handlers]
model:
  factory: "torchgraft.models:build_llama"
  kwargs: {preset: tiny}
  inputs: [{shape: [2, 16], dtype: int64, high: 256}]
handlers: [t_relu, t_silu]
"""


def test_run_refuses_what_check_reports_and_trains_what_the_config_allows(tmp_path, capsys):
    path = write(tmp_path, PLAN_WITH_PROBLEMS)
    assert cli.main(["check", str(path)]) == 1
    capsys.readouterr()
    code, _, err, out = run(path, tmp_path, capsys, "--steps", "1")
    assert code == 1 and "nothing was trained" in err and "[no_match] t_relu" in err
    assert "allow: [no_match]" in err and not out.exists()
    for opt_out in (
        PLAN_WITH_PROBLEMS + "allow: [no_match]\n",
        PLAN_WITH_PROBLEMS.replace("[t_relu, t_silu]", "[{t_relu: {optional: true}}, t_silu]"),
    ):
        path = write(tmp_path, opt_out)
        assert cli.main(["check", str(path)]) == 0
        capsys.readouterr()
        code, printed, err, out = run(path, tmp_path, capsys, "--steps", "1")
        assert code == 0, err
        assert metrics(out)["steps"] == 1
        assert ("[no_match] t_relu" in printed) == ("allow" in opt_out)


def test_a_config_stating_the_batch_twice_differently_names_both_lines():
    text = textwrap.dedent(
        """\
        model:
          factory: "torchgraft.models:build_llama"
          inputs: [{shape: [4, 32], dtype: int64, high: 256}]
        train: {batch_size: 8}
        """
    )
    with pytest.raises(tg.TorchgraftError) as info:
        parse_config(text, "run.yaml")
    assert str(info.value).startswith("run.yaml:4:21: train.batch_size is 8")
    assert "model.inputs[0] has shape [4, 32] (at run.yaml:3:20)" in str(info.value)
