"""End-to-end tests of torchgraft.train.train on the tiny Llama (CPU, a few seconds)."""

from __future__ import annotations

import math
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from torchgraft.models.llama import build_llama
from torchgraft.train import NonFiniteError, TrainConfig, train


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, progress=False)
    return TrainConfig(**{**settings, **overrides})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_params(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, expected[name]) for name, p in model.named_parameters())


class Poisoned(nn.Module):
    """The tiny Llama with a NaN loss, or a NaN gradient, at chosen forward calls."""

    def __init__(self, *, nan_loss_at=(), nan_grad_at=(), seed: int = 0) -> None:
        super().__init__()
        self.inner = build_llama("tiny", with_loss=True, seed=seed)
        self.nan_loss_at, self.nan_grad_at = set(nan_loss_at), set(nan_grad_at)
        self.calls = 0
        self.inner.model.norm.weight.register_post_accumulate_grad_hook(self._poison_grad)

    def _poison_grad(self, param: torch.Tensor) -> None:
        if self.calls - 1 in self.nan_grad_at:
            param.grad.fill_(math.nan)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.inner(tokens, labels)
        return loss * math.nan if self.calls - 1 in self.nan_loss_at else loss


class Recorder:
    """A handler that logs its optimizer hooks (and what they see) into a shared list."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events

    def pre_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        self._record("pre", model_parts)

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        self._record("post", model_parts)

    def _record(self, kind: str, model_parts: list[nn.Module]) -> None:
        (model,) = model_parts
        weight = next(p for n, p in model.named_parameters() if n.endswith("output.weight"))
        in_optimizer_step = any(
            Path(frame.filename).match("torch/optim/optimizer.py")
            for frame in traceback.extract_stack()
        )
        self.events.append(
            (
                self.name,
                kind,
                model,
                weight.detach().clone(),
                weight.grad is not None,
                in_optimizer_step,
            )
        )


def test_same_seed_gives_bit_identical_losses_and_weights():
    runs = []
    for seed in (0, 0, 1):
        model = build_llama("tiny", with_loss=True)
        runs.append((train(model, tiny_config(seed=seed)).losses, snapshot(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][name], runs[1][1][name]) for name in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_loss_falls_on_tiny_model():
    model = build_llama("tiny", with_loss=True)
    result = train(model, tiny_config(steps=30, batch_size=4, seq_len=64, warmup_steps=5))
    assert len(result.losses) == result.steps == 30 and result.skipped_steps == 0
    assert result.start_step == 0 and result.wall_s > 0 and result.tokens_per_s > 0
    assert math.isclose(result.losses[0], math.log(256), rel_tol=0.2)
    assert sum(result.losses[-5:]) / 5 < 0.6 * result.losses[0]


def test_handler_hooks_wrap_each_applied_optimizer_step():
    events: list = []
    model = Poisoned(nan_loss_at={2})
    result = train(model, tiny_config(steps=5), [Recorder("a", events), Recorder("b", events)])
    assert result.steps == 4 and result.skipped_steps == 1
    assert [(name, kind) for name, kind, *_ in events] == [
        ("a", "pre"), ("b", "pre"), ("a", "post"), ("b", "post")
    ] * 4  # fmt: skip
    for *_, part, _weight, has_grad, in_optimizer_step in events:
        assert part is model and has_grad and in_optimizer_step
    for pre, post in zip(events[0::4], events[2::4], strict=True):
        assert not torch.equal(pre[3], post[3])  # pre sees old weights, post the updated ones
    for post, next_pre in zip(events[2::4], events[4::4]):
        assert torch.equal(post[3], next_pre[3])


@pytest.mark.parametrize("poison", ["nan_loss_at", "nan_grad_at"])
def test_nonfinite_step_is_skipped_and_changes_nothing(poison):
    events: list = []
    model = Poisoned(**{poison: {0, 1, 2}})
    before = snapshot(model)
    result = train(model, tiny_config(steps=3), [Recorder("a", events)])
    assert result.skipped_steps == 3 and result.steps == 0
    assert all(math.isnan(loss) for loss in result.losses) and len(result.losses) == 3
    assert same_params(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert events == []


def test_skipped_step_does_not_advance_the_schedule():
    class StepLog:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def lr_multiplier(self, step: int) -> float:
            self.steps.append(step)
            return 1.0

    log = StepLog()
    result = train(Poisoned(nan_grad_at={1}), tiny_config(steps=4), [log])
    assert [math.isnan(loss) for loss in result.losses] == [False, True, False, False]
    assert result.steps == 3 and result.skipped_steps == 1
    assert sorted(set(log.steps)) == [0, 1, 2, 3]  # construction + 3 applied updates


def test_stops_after_max_nonfinite_in_a_row():
    model = Poisoned(nan_loss_at=range(100))
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as error:
        train(model, tiny_config(steps=10, max_nonfinite_in_a_row=3))
    assert model.calls == 3 and error.value.in_a_row == 3 and error.value.step == 2
    # A finite step in between resets the count.
    result = train(Poisoned(nan_loss_at={0, 1, 3, 4}), tiny_config(max_nonfinite_in_a_row=3))
    assert result.skipped_steps == 4 and result.steps == 2


def test_resume_from_checkpoint_is_exact(tmp_path):
    config = tiny_config(steps=8, checkpoint_every=3)
    plain_model = build_llama("tiny", with_loss=True)
    plain = train(plain_model, config)
    checkpointed = train(
        build_llama("tiny", with_loss=True), tiny_config(steps=8, checkpoint_dir=tmp_path / "full")
    )
    assert checkpointed.losses == plain.losses  # saving does not perturb training

    class CrashAfter:
        def __init__(self, applied: int) -> None:
            self.left = applied

        def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
            self.left -= 1
            if self.left == 0:
                raise RuntimeError("simulated crash")

    crashed_config = tiny_config(steps=8, checkpoint_every=3, checkpoint_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(build_llama("tiny", with_loss=True), crashed_config, [CrashAfter(5)])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-3"]

    resumed_model = build_llama("tiny", with_loss=True, seed=123)  # weights come from step-3
    resumed = train(resumed_model, TrainConfig(**{**vars(crashed_config), "resume": True}))
    assert resumed.start_step == 3
    assert resumed.losses == plain.losses[3:]
    assert same_params(resumed_model, snapshot(plain_model))


def test_resume_from_checkpoint_taken_before_any_update(tmp_path):
    events: list = []
    config = tiny_config(steps=5, checkpoint_every=2, checkpoint_dir=tmp_path)
    full = train(Poisoned(nan_loss_at={0, 1}), config, [Recorder("a", events)])
    assert full.skipped_steps == 2 and len(events) == 2 * 3  # saving fired no hook
    shutil.rmtree(tmp_path / "step-4")
    resumed = train(Poisoned(seed=7), TrainConfig(**{**vars(config), "resume": True}))
    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    config = tiny_config(steps=2, checkpoint_dir=tmp_path, resume=True)
    result = train(build_llama("tiny", with_loss=True), config)
    assert result.start_step == 0 and len(result.losses) == 2


def test_exported_graph_module_trains_the_original_parameters():
    model = build_llama("tiny", with_loss=True)
    tokens = torch.zeros(2, 32, dtype=torch.long)
    graph_module = torch.export.export(model, (tokens, tokens)).module()
    before = snapshot(model)
    result = train(graph_module, tiny_config(steps=3))
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_progress_bar_shows_loss_and_tokens_per_second(capsys):
    train(build_llama("tiny", with_loss=True), tiny_config(steps=2, progress=True))
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err
