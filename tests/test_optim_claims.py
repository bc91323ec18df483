"""Optimizer and LR-schedule extension points: claims, conflicts, hooks, exact resume, and
the built-in ``muon`` (against an fp64 reference) and ``wsd``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.handlers.claims import OptimizerClaim
from torchgraft.handlers.wsd import wsd
from torchgraft.models import build_llama
from torchgraft.ops.muon import Muon, newton_schulz
from torchgraft.ops.numerics import sqnr
from torchgraft.train import TrainConfig, train
from torchgraft.train.combined import CombinedOptimizer
from torchgraft.train.optim import build_optimizer
from torchgraft.train.schedule import build_scheduler, handler_schedule


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, progress=False)
    return TrainConfig(**{**settings, **overrides})


def handlers(*plan) -> list[tg.Handler]:
    pm = tg.PassManager(list(plan))
    assert pm.problems == []
    return pm.handlers


class SGDOnNorms(tg.Handler):
    """Claims the norm weights for SGD (and, with ``also``, more globs)."""

    @dataclasses.dataclass(kw_only=True)
    class Options:
        also: list[str] = dataclasses.field(default_factory=list)

    def optimizer_claims(self) -> list[OptimizerClaim]:
        globs = ("*norm*", *self.options.also)
        return [OptimizerClaim(globs, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})]


class Constant(tg.Handler):
    def lr_schedule(self, total_steps: int):
        return lambda step: 0.5


def test_claims_split_the_parameters_between_optimizers():
    model = build_llama("tiny", with_loss=True)
    optimizer = build_optimizer(model, tiny_config(), handlers("muon", SGDOnNorms))
    assert isinstance(optimizer, CombinedOptimizer)
    adamw, muon, sgd = optimizer.optimizers
    assert (type(adamw), type(muon), type(sgd)) == (torch.optim.AdamW, Muon, torch.optim.SGD)
    names = {id(p): n for n, p in model.named_parameters()}

    def owned(opt):
        return {names[id(p)] for g in opt.param_groups for p in g["params"]}

    hidden = {
        n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2
    }
    assert owned(muon) == hidden and len(hidden) == 14  # wq wk wv wo w1 w2 w3 per layer
    assert owned(sgd) == {n for n in names.values() if "norm" in n}
    assert owned(adamw) == {"model.tok_embeddings.weight", "model.output.weight"}
    assert muon.param_groups[0]["lr"] == 0.02 and sgd.param_groups[0]["momentum"] == 0.9
    # one optimizer: the groups and the state are the children's own
    assert optimizer.param_groups == [*adamw.param_groups, *muon.param_groups, *sgd.param_groups]
    # without claims the optimizer is a plain AdamW, as before
    assert type(build_optimizer(model, tiny_config(), [])) is torch.optim.AdamW


class Renamed(nn.Module):
    """A language model whose embedding and head have no usual name, and a hidden layer
    shaped like the head (width -> vocabulary)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(256, 32)
        self.up = nn.Linear(32, 256)
        self.down = nn.Linear(256, 32)
        self.readout = nn.Linear(32, 256, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.table(tokens)
        h = h + self.down(torch.relu(self.up(h)))
        return nn.functional.cross_entropy(self.readout(h).flatten(0, 1), labels.flatten())


def test_muon_leaves_embedding_and_head_to_adamw_by_structure():
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(Renamed(), (tokens, tokens))
    optimizer = build_optimizer(gm, tiny_config(), handlers("muon"))
    adamw, muon = optimizer.optimizers
    names = {id(p): n for n, p in gm.named_parameters()}
    owned = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert owned == {"up.weight", "down.weight"}  # "up" is shaped like a head, but is not one
    kept = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"table.weight", "readout.weight"} <= kept
    # by name as well, if asked; an unknown role is refused
    plan = handlers({"muon": {"exclude": ["down.*"], "exclude_roles": ["head"]}})
    optimizer = build_optimizer(gm, tiny_config(), plan)
    owned = {names[id(p)] for g in optimizer.optimizers[1].param_groups for p in g["params"]}
    assert owned == {"table.weight", "up.weight"}
    refused = tg.PassManager([{"muon": {"exclude_roles": ["bias"]}}]).problems
    assert [p.kind for p in refused] == ["bad_option"] and "roles are" in refused[0].message


def test_two_claims_on_one_parameter_and_two_schedules_are_overlaps(llama_gm):
    pm = tg.PassManager(["muon", SGDOnNorms(also=["*wq*"])])
    problems = pm.check(llama_gm)
    assert [p.kind for p in problems] == ["overlap"]
    assert problems[0].handlers == ("muon", "SGDOnNorms")
    assert "layers.0.attention.wq.weight' (and 1 more)" in problems[0].message
    model = build_llama("tiny", with_loss=True)
    with pytest.raises(ValueError, match="both claim parameter"):
        build_optimizer(model, tiny_config(), pm.handlers)
    schedules = tg.PassManager(["wsd", Constant])
    assert [p.kind for p in schedules.problems] == ["overlap"]
    assert "each supply the LR schedule" in schedules.problems[0].message
    with pytest.raises(ValueError, match="each supply the LR schedule"):
        handler_schedule(schedules.handlers, 10)
    # a claim that covers nothing is a no_match; an optimizer-only handler is not one
    assert tg.PassManager(["muon", "wsd"]).check(llama_gm) == []
    missing = tg.PassManager([{"muon": {"params": ["nothing.*"]}}]).check(llama_gm)
    assert [p.kind for p in missing] == ["no_match"] and "claims no parameter" in missing[0].message


def test_muon_step_matches_an_fp64_reference():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(48, 32))
    reference = weight.detach().double().clone()
    optimizer = Muon([weight], lr=0.05, momentum=0.9, weight_decay=0.1)
    buffer = torch.zeros_like(reference)
    for _ in range(3):
        grad = torch.randn(48, 32)
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        buffer = 0.9 * buffer + g
        x = (g + 0.9 * buffer).T  # tall: iterate on the transpose
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        reference = reference * (1 - 0.05 * 0.1) - 0.05 * (48 / 32) ** 0.5 * x.T
    assert sqnr(weight.detach().double(), reference) > 100.0
    assert optimizer.state[weight]["step"].item() == 3


def test_newton_schulz_orthogonalizes():
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    o = newton_schulz(g)
    singular = torch.linalg.svdvals(o.double())
    assert singular.min() > 0.6 and singular.max() < 1.25  # pushed near 1, not exactly
    cosine = (o.double() * (u @ vh)).sum() / (o.double().norm() * (u @ vh).norm())
    assert cosine > 0.97
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.randn(3, 4, 5))


def test_wsd_schedule_values_and_use():
    values = [
        wsd(s, warmup_steps=2, total_steps=10, decay_steps=4, min_lr_ratio=0.1, shape="linear")
        for s in range(12)
    ]
    assert values[:2] == [0.5, 1.0] and values[2:6] == [1.0] * 4
    assert values[6:] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    sqrt = wsd(8, warmup_steps=2, total_steps=10, decay_steps=4, min_lr_ratio=0.0, shape="1-sqrt")
    assert sqrt == pytest.approx(1 - 0.5**0.5)
    (handler,) = handlers({"wsd": {"warmup_steps": 2, "decay_fraction": 0.4, "shape": "linear"}})
    schedule = handler_schedule([handler], 10)
    model = build_llama("tiny", with_loss=True)
    optimizer = build_optimizer(model, tiny_config(lr=1.0), [handler])
    scheduler = build_scheduler(
        optimizer, warmup_steps=5, total_steps=10, min_lr_ratio=0.5, schedule=schedule
    )
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pre_optimizer_hook(self, model_parts) -> None:
        self.events.append("pre")

    def post_optimizer_hook(self, model_parts) -> None:
        self.events.append("post")


def test_hooks_and_exact_resume_with_muon_and_wsd(tmp_path):
    plan = handlers("muon", {"wsd": {"warmup_steps": 2}})
    recorder = Recorder()
    config = tiny_config(steps=8)
    plain_model = build_llama("tiny", with_loss=True)
    plain = train(plain_model, config, [*plan, recorder])
    assert recorder.events == ["pre", "post"] * 8
    adamw = train(build_llama("tiny", with_loss=True), config)
    assert plain.losses[0] == adamw.losses[0] and plain.losses[1:] != adamw.losses[1:]

    class CrashAfter:
        def __init__(self, applied: int) -> None:
            self.left = applied

        def post_optimizer_hook(self, model_parts) -> None:
            self.left -= 1
            if self.left == 0:
                raise RuntimeError("simulated crash")

    crashed = tiny_config(steps=8, checkpoint_every=3, checkpoint_dir=tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(build_llama("tiny", with_loss=True), crashed, [*plan, CrashAfter(5)])
    resumed_model = build_llama("tiny", with_loss=True, seed=123)
    resumed = train(resumed_model, TrainConfig(**{**vars(crashed), "resume": True}), plan)
    assert resumed.start_step == 3 and resumed.losses == plain.losses[3:]
    expected = dict(plain_model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in resumed_model.named_parameters())
