"""Unit tests of the training package's parts: config, data, schedule, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchgraft.models.llama import build_llama
from torchgraft.train import (
    BUILTIN_CORPUS,
    RandomWindows,
    TrainConfig,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    load_tokens,
    train,
    warmup_cosine,
)


def group_of(groups: list[dict], model: nn.Module, fqn: str) -> dict:
    param = dict(model.named_parameters())[fqn]
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_config_validates_and_is_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig(10)  # type: ignore[misc]
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(resume=True)


def test_builtin_corpus_is_a_small_english_text():
    raw = BUILTIN_CORPUS.read_bytes()
    assert 15_000 <= len(raw) <= 30_000
    assert "gradient" in raw.decode("utf-8")


def test_random_windows_are_seeded_shifted_slices_of_the_text():
    data = load_tokens(None, seq_len=16)
    windows = RandomWindows(data, batch_size=3, seq_len=16, seed=4)
    tokens, labels = next(windows)
    assert tokens.shape == labels.shape == (3, 16) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    text = BUILTIN_CORPUS.read_bytes()
    for row_tokens, row_labels in zip(tokens, labels, strict=True):
        assert bytes(row_tokens.tolist()) + bytes([row_labels[-1]]) in text

    again = RandomWindows(data, batch_size=3, seq_len=16, seed=4)
    assert torch.equal(next(again)[0], tokens)
    position = again.state_dict()
    expected = next(again)
    again.load_state_dict(position)
    assert all(torch.equal(a, b) for a, b in zip(next(again), expected, strict=True))


def test_load_tokens_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokens(missing, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("héllo")
    with pytest.raises(ValueError, match=r"short.txt has 6 bytes; seq_len=8 needs at least 9"):
        load_tokens(short, seq_len=8)


def test_trains_on_a_user_text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    config = TrainConfig(steps=2, batch_size=2, seq_len=32, data_path=path, progress=False)
    result = train(build_llama("tiny", with_loss=True), config)
    assert result.steps == 2


def test_warmup_cosine_values():
    def lr(step: int) -> float:
        return warmup_cosine(step, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)

    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0
    assert math.isclose(lr(9), 0.55)  # halfway through the decay
    assert math.isclose(lr(14), 0.1) and math.isclose(lr(100), 0.1)
    assert all(lr(s) > lr(s + 1) for s in range(4, 14))
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


def test_scheduler_multiplies_handler_factors_per_group():
    model = build_llama("tiny", with_loss=True)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1))
    scheduler = build_scheduler(
        optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.0, multipliers=[lambda s: 0.5]
    )
    for step in range(6):
        expected = 0.1 * warmup_cosine(step, warmup_steps=2, total_steps=6, min_lr_ratio=0.0) * 0.5
        assert all(math.isclose(g["lr"], expected) for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()


def test_default_groups_exempt_norms_biases_and_embeddings():
    model = build_llama("tiny", with_loss=True)
    groups = build_param_groups(model, (), lr=1.0, weight_decay=0.1)
    for fqn, _ in model.named_parameters():
        decayed = not ("norm" in fqn or "embed" in fqn)
        assert group_of(groups, model, fqn)["weight_decay"] == (0.1 if decayed else 0.0), fqn
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    small = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = build_param_groups(small, (), lr=1.0, weight_decay=0.1)
    assert group_of(groups, small, "0.weight")["weight_decay"] == 0.1
    for fqn in ("0.bias", "1.weight", "1.bias"):
        assert group_of(groups, small, fqn)["weight_decay"] == 0.0


def test_handler_param_groups_first_matching_glob_wins():
    class Handler:
        def param_groups(self):
            return [
                (["model.layers.0.*"], {"lr_scale": 0.5}),
                (["model.layers.*", "model.output.*"], {"weight_decay": 0.01}),
            ]

    model = build_llama("tiny", with_loss=True)
    groups = build_param_groups(model, [Handler()], lr=1.0, weight_decay=0.1)
    wq0 = group_of(groups, model, "model.layers.0.attention.wq.weight")
    assert (wq0["lr"], wq0["weight_decay"]) == (0.5, 0.1)
    norm0 = group_of(groups, model, "model.layers.0.attention_norm.weight")
    assert (norm0["lr"], norm0["weight_decay"]) == (0.5, 0.0)  # built-in default kept
    wq1 = group_of(groups, model, "model.layers.1.attention.wq.weight")
    assert (wq1["lr"], wq1["weight_decay"]) == (1.0, 0.01)
    embed = group_of(groups, model, "model.tok_embeddings.weight")
    assert (embed["lr"], embed["weight_decay"]) == (1.0, 0.0)
    assert all("lr_scale" not in g for g in groups)


def test_handler_param_groups_errors():
    class Typo:
        def param_groups(self):
            return [(["model.layers.*.atention.*"], {"weight_decay": 0.0})]

    class Unknown:
        def param_groups(self):
            return [(["model.output.*"], {"decay": 0.0})]

    model = build_llama("tiny", with_loss=True)
    with pytest.raises(ValueError, match=r"Typo.*'model.layers.\*.atention.\*' matches no param"):
        build_param_groups(model, [Typo()], lr=1.0, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"Unknown.*unknown optimizer option.*decay"):
        build_param_groups(model, [Unknown()], lr=1.0, weight_decay=0.1)
