"""The ``compile`` stage: rules inside ``torch.compile`` as one Inductor post-grad pass,
composed with the user's own pass, with an FX-graph-cache-safe uuid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import torchgraft as tg
from torchgraft.passes.compile_capture import capture_compile, check_compile
from torchgraft.passes.compile_stage import CompileStagePass, cache_counts
from torchgraft.passes.report import Report

aten = torch.ops.aten


class ReluAsClamp(tg.Handler):
    """``relu(x)`` → ``clamp_min(x, floor)`` (exact for ``floor`` 0)."""

    stage = "compile"

    @dataclasses.dataclass(kw_only=True)
    class Options:
        floor: float = 0.0

    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(self, x):
        return aten.clamp_min.default(x, self.options.floor)


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass: counts the graphs it saw."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: fx.Graph) -> None:
        self.graphs += 1

    def uuid(self) -> str:
        return "counting-pass-v1"


def compiled_run(gm, x, plan) -> tuple[torch.Tensor, dict[str, int], dict[str, int]]:
    """A fresh compile of ``gm`` with ``plan``; (output, matches, cache counters delta)."""
    torch._dynamo.reset()
    before = cache_counts()
    pm = tg.PassManager(plan)
    report = pm.run(gm)
    with torch.no_grad():
        out = pm.compile_module(gm, report)(x)
    after = cache_counts()
    return out, report.matches, {k: after[k] - before[k] for k in after}


def test_compile_stage_rewrites_counts_and_keeps_the_fx_graph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    user_pass = CountingPass()
    # Inductor's own patch: pytest's monkeypatch undo leaves torch 2.15's config without the
    # key, which breaks every later compile in the session.
    with torch._inductor.config.patch(post_grad_custom_post_pass=user_pass):
        _check_rewrites_counts_and_cache(user_pass)


def _check_rewrites_counts_and_cache(user_pass: CountingPass) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    gm = tg.capture(model, (x,))
    expected = model(x)

    out, matches, cache = compiled_run(gm, x, [ReluAsClamp])
    assert matches == {"ReluAsClamp": 1} and cache == {"cache_hits": 0, "cache_misses": 1}
    assert torch.equal(out, expected.detach())
    assert user_pass.graphs == 1  # the user's pass still runs, before torchgraft's

    out, matches, cache = compiled_run(gm, x, [ReluAsClamp])  # unchanged: a cache hit
    assert cache == {"cache_hits": 1, "cache_misses": 0}
    assert matches == {"ReluAsClamp": 0} and user_pass.graphs == 1  # nothing compiled
    assert torch.equal(out, expected.detach())

    out, matches, cache = compiled_run(gm, x, [ReluAsClamp(floor=0.5)])  # option changed
    assert cache == {"cache_hits": 0, "cache_misses": 1} and matches == {"ReluAsClamp": 1}
    assert torch.equal(out, model[2](model[0](x).clamp_min(0.5)).detach())
    assert tg.PassManager([ReluAsClamp]).stages.keys() == {"compile"}
    with pytest.raises(tg.CheckError):
        tg.PassManager([ReluAsClamp, "nope"]).compile_module(gm)


class ReluAsMaximum(ReluAsClamp):
    """The same rewrite written differently: a different rule source."""

    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(self, x):
        return aten.clamp.default(x, self.options.floor)


def uuid_of(plan, previous=None):
    pm = tg.PassManager(plan)
    steps = pm.stage_steps("compile")
    return CompileStagePass(steps, pm.rewrite_stage, Report(order=[]), {}, previous).uuid()


def test_uuid_follows_rule_sources_options_and_the_composed_pass():
    assert uuid_of([ReluAsClamp]) == uuid_of([ReluAsClamp])
    assert uuid_of([ReluAsClamp]) != uuid_of([ReluAsMaximum])
    assert uuid_of([ReluAsClamp]) != uuid_of([ReluAsClamp(floor=1.0)])
    assert uuid_of([ReluAsClamp], CountingPass()) != uuid_of([ReluAsClamp])
    assert uuid_of([ReluAsClamp], lambda graph: None) is None  # no uuid: bypass the cache
    namespace: dict = {"tg": tg, "aten": aten}
    exec("class Anonymous(tg.Handler):\n    stage = 'compile'\n", namespace)  # no source file
    assert uuid_of([namespace["Anonymous"]]) is None


def test_check_of_the_compile_stage_compares_dropout_models_with_the_same_masks():
    """A model with dropout, in training mode: ``check`` compiles its step with the random
    ops on eager kernels, so the compiled step draws the masks the eager one does and the
    exact rewrite is judged exact (Inductor's own RNG draws others)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    x = torch.randn(16, 8)
    gm = tg.capture(model.train(), (x,))
    report = check_compile(tg.PassManager([ReluAsClamp]), gm, (x,))
    assert report.matches == {"ReluAsClamp": 1}
    assert report.problems == []


class BiasedProducts(nn.Module):
    """``addmm`` with its default scaling, which oneDNN computes, and with ``beta=0.5``,
    which it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = torch.addmm(self.b, x, self.w)
        return plain.relu() + torch.addmm(self.b, x, self.w, beta=0.5).sigmoid()


def test_onednn_matmul_takes_addmm_with_a_bias_per_column():
    """``onednn_matmul`` on the compiled step of ``BiasedProducts``: the forward's default
    ``addmm`` (GPT-2's ``Conv1D``) becomes ``onednn_mm`` with its bias, the ``beta=0.5`` one
    and the backward's ``addmm`` that accumulates a 2-D gradient stay; the step is exact."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    gm = tg.capture(BiasedProducts(), (x,))
    pm = tg.PassManager(["onednn_matmul"])
    pm.run(gm)
    capture = capture_compile(pm, gm, (x,))
    assert capture.report.problems == []
    forward = next(g for g in capture.graphs if g.name == "forward").after.graph
    onednn = forward.find_nodes(op="call_function", target=torch.ops.torchgraft.onednn_mm.default)
    addmm = forward.find_nodes(op="call_function", target=aten.addmm.default)
    assert len(onednn) == 1 and len(onednn[0].args) == 3  # with its bias
    assert [n.kwargs for n in addmm] == [{"beta": 0.5}]
