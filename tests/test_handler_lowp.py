"""The float8, int8, MX and BitNet handlers on the tiny Llama: what they rewrite, what they
skip and why, options, overlap between them, state_dict and checkpoints."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

import torchgraft as tg
from torchgraft.handlers.linear_rules import LinearHandler
from torchgraft.handlers.options import OptionError
from torchgraft.ir.provenance import module_glob
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr

ops = torch.ops.torchgraft
aten = torch.ops.aten

LOWP = ("float8", "int8", "mx", "bitnet")
OP_OF = {
    "float8": ops.float8_linear.default,
    "int8": ops.int8_linear.default,
    "mx": ops.mx_linear.default,
    "bitnet": ops.bitnet_linear.default,
}
TINY_LINEARS = 14  # 2 layers x (wq, wk, wv, wo, w1, w2, w3); the head model.output is skipped
FORMS = (
    "linear",
    "linear_bias",
    "addmm",
    "addmm_t",
    "mm",
    "mm_t",
    "matmul",
    "matmul_t",
    "matmul_T",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead, and on a loaded 2-core machine
    OpenMP spin-waiting made these tests 10-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0, shape: tuple[int, int] = (2, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # two distinct tensors: export would bake an aliasing of tokens and labels into the graph
    return torch.randint(0, 256, shape, generator=gen), torch.randint(0, 256, shape, generator=gen)


def tiny_gm(seed: int = 0, **overrides) -> torch.fx.GraphModule:
    model = build_llama("tiny", with_loss=True, seed=seed, **overrides)
    return tg.capture(model, batch())


def count(gm: torch.fx.GraphModule, target) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=target))


def overlaps(plan, gm) -> list:
    return [p for p in tg.PassManager(plan).check(gm) if p.kind == "overlap"]


@pytest.mark.parametrize("name", LOWP)
def test_every_eligible_linear_is_rewritten_and_output_skipped(name):
    gm = tiny_gm()
    handler = tg.get_handler(name)()
    report = tg.PassManager([handler]).run(gm)
    assert report.matches == {name: TINY_LINEARS}
    assert report.rule_matches[name] == {**dict.fromkeys(FORMS, 0), "linear": TINY_LINEARS}
    assert count(gm, OP_OF[name]) == TINY_LINEARS
    (left,) = gm.graph.find_nodes(op="call_function", target=aten.linear.default)
    assert left.args[1].target == "model.output.weight"
    (skipped,) = handler.skipped(gm)
    assert skipped.module_fqn == "model.output"
    assert skipped.reason == (
        "module 'model.output' produces the logits (the head stays in high precision; "
        "set skip_head: false to convert it)"
    )
    loss = gm(*batch(1))
    loss.backward()
    assert (
        torch.isfinite(loss)
        and gm.get_parameter("model.layers.0.attention.wq.weight").grad is not None
    )


def test_float8_lists_ineligible_linears_with_reasons():
    gm = tiny_gm(hidden_dim=72)  # w1, w3: [72, 64]; w2: [64, 72]
    handler = tg.get_handler("float8")()
    before = handler.skipped(gm)
    report = tg.PassManager([handler]).run(gm)
    assert report.matches == {"float8": 8}  # wq, wk, wv, wo per layer
    after = handler.skipped(gm)
    assert after == before
    ineligible = {s.module_fqn: s.reason for s in after if "logits" not in s.reason}
    assert set(ineligible) == {
        f"model.layers.{i}.feed_forward.{w}" for i in range(2) for w in ("w1", "w2", "w3")
    }
    assert ineligible["model.layers.0.feed_forward.w2"] == (
        "float8 needs both weight dims to be multiples of 16, weight is [64, 72] "
        "(out_features x in_features)"
    )
    assert all("llama.py" in s.source for s in after)
    # explain states the same reason at the node
    node = next(n for n in gm.graph.nodes if n.name == after[0].node)
    text = str(tg.explain(handler.rules()[0], node, handler))
    assert (
        "handler 'float8' rejects it: float8 needs both weight dims to be multiples of 16" in text
    )


def test_mx_requires_k_multiple_of_32():
    gm = tiny_gm(hidden_dim=80)  # w2 has K = 80; w1 / w3 have K = 64
    handler = tg.get_handler("mx")()
    report = tg.PassManager([handler]).run(gm)
    assert report.matches == {"mx": 12}
    ineligible = [s for s in handler.skipped(gm) if "logits" not in s.reason]
    assert [s.module_fqn for s in ineligible] == [
        "model.layers.0.feed_forward.w2",
        "model.layers.1.feed_forward.w2",
    ]
    assert "multiple of the block size 32, weight is [64, 80] (K=80)" in ineligible[0].reason


def test_linear_with_bias_uses_the_bias_rule():
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16, bias=False)
    )
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0))
    ref = model(x)
    gm = tg.capture(model, (x,))
    report = tg.PassManager([{"float8": {"skip_head": False}}]).run(gm)
    assert report.rule_matches["float8"] == {
        **dict.fromkeys(FORMS, 0),
        "linear": 1,
        "linear_bias": 1,
    }
    biased = next(n for n in gm.graph.nodes if n.target == ops.float8_linear.default)
    assert biased.args[2].target == "0.bias"
    assert sqnr(gm(x), ref) > 20.0


def test_skip_fqns_globs():
    assert module_glob("model.output", ["output"]) == "output"
    assert module_glob("output", ["output"]) == "output"
    assert module_glob("model.output_proj", ["output"]) is None
    assert module_glob("model.layers.0.attention.wq", ["attention"]) == "attention"
    assert module_glob("model.layers.10.attention.wq", ["layers.1"]) is None
    assert module_glob("model.layers.1.feed_forward.w2", ["x", "layers.*.w2"]) == "layers.*.w2"
    gm = tiny_gm()
    report = tg.PassManager([{"int8": {"skip_fqns": ["output", "layers.1", "wq"]}}]).run(gm)
    assert report.matches == {"int8": 6}  # layer 0 without wq


def test_options_are_typed_and_validated():
    assert tg.get_handler("float8")().options.recipe == "tensorwise"
    assert tg.get_handler("int8")().options.mode == "training"
    assert tg.get_handler("mx")().options.format == "mxfp8"
    for name in LOWP:
        options = tg.get_handler(name)().options
        assert options.skip_fqns == [] and options.skip_head is True
        assert issubclass(tg.get_handler(name), LinearHandler)
    with pytest.raises(OptionError, match="recipe"):
        tg.get_handler("float8")(recipe="blockwise")
    with pytest.raises(OptionError, match="only with mode='training'"):
        tg.get_handler("int8")(mode="dynamic", int8_grad_weight=False)
    with pytest.raises(OptionError, match="skip_fqns"):
        tg.get_handler("bitnet")(skip_fqns="output")
    gm = tiny_gm()
    plan = [{"int8": {"mode": "training", "int8_grad_weight": False}}]
    tg.PassManager(plan).run(gm)
    node = next(n for n in gm.graph.nodes if n.target == ops.int8_linear.default)
    assert node.args[3:] == ("training", True, True, False, "auto")


def test_sqnr_tolerances():
    tolerances = {name: tg.get_handler(name).sqnr_tolerance for name in LOWP}
    assert tolerances == {"float8": 12.0, "int8": 26.0, "mx": 3.0, "bitnet": -3.0}
    assert tg.get_handler("mx")(format="mxfp8").sqnr_tolerance == 14.0
    assert tg.get_handler("mx")(format="mxfp4").sqnr_tolerance == 3.0
    ops = {name: tg.get_handler(name)().op_sqnr_tolerance for name in LOWP}
    assert ops == {"float8": 15.0, "int8": 10.0, "mx": 15.0, "bitnet": 2.0}  # per op, calibrated
    assert tg.get_handler("mx")(format="mxfp4").op_sqnr_tolerance == 6.0


@pytest.mark.parametrize(
    "plan", [["float8"], [{"float8": {"recipe": "rowwise"}}], ["int8"], ["mx"], ["bitnet"]]
)
def test_verify_passes_on_the_tiny_llama(plan):
    problems = tg.PassManager(plan).check(tiny_gm(seed=3))
    assert problems == []


def test_any_two_overlap():
    # find_overlaps judges every pair of the plan on the captured graph: one check, six pairs
    found = {p.handlers: p for p in overlaps(list(LOWP), tiny_gm())}
    assert set(found) == set(itertools.combinations(LOWP, 2))
    for problem in found.values():
        assert problem.rule == "linear / linear"
        assert "(and 13 more)" in problem.message


def test_disjoint_skip_fqns_do_not_overlap():
    gm = tiny_gm()
    plan = [
        {"float8": {"skip_fqns": ["output", "feed_forward"]}},
        {"int8": {"skip_fqns": ["output", "attention"]}},
        {"bitnet": {"skip_fqns": ["layers"], "skip_head": False}},  # only model.output
    ]
    assert overlaps(plan, gm) == []
    report = tg.PassManager(plan).run(gm)
    assert report.matches == {"float8": 8, "int8": 6, "bitnet": 1}
    assert count(gm, aten.linear.default) == 0
    # one shared module is enough to overlap again
    plan[1] = {"int8": {"skip_fqns": ["output", "attention.w[qkv]"]}}
    (problem,) = overlaps(plan, tiny_gm())
    assert "model.layers.0.attention.wo" in problem.message


@pytest.mark.parametrize("name", LOWP)
def test_state_dict_unchanged_and_unconverted_checkpoint_loads(name, tmp_path):
    gm = tiny_gm(seed=0)
    before = {k: (v.shape, v.dtype) for k, v in gm.state_dict().items()}
    tg.PassManager([name]).run(gm)
    assert {k: (v.shape, v.dtype) for k, v in gm.state_dict().items()} == before

    other = build_llama("tiny", with_loss=True, seed=1)  # unconverted, different weights
    path = tmp_path / "ckpt.pt"
    torch.save(other.state_dict(), path)
    gm.load_state_dict(torch.load(path, weights_only=True), strict=True)
    params = dict(gm.named_parameters())
    assert params.keys() == dict(other.named_parameters()).keys()
    for key, p in other.named_parameters():
        assert torch.equal(params[key], p), key
    loss = gm(*batch(2))
    assert torch.isfinite(loss)


class EveryForm(torch.nn.Module):
    """A linear layer in each form models write it, then a head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) / shape[0] ** 0.5)

        self.conv1d_w, self.conv1d_b = param(32, 64), param(64)  # GPT-2 Conv1D: [in, out]
        self.mm_w = param(64, 64)  # x2d @ w
        self.mat_w = param(64, 32)  # x @ w, [in, out]
        self.mat_t = param(32, 32)  # x @ w.t(), [out, in]
        self.mat_T = param(64, 32)  # x @ w.T, [out, in]
        self.head = torch.nn.Linear(64, 16)

    as_linear = False
    """Compute the same layers with ``F.linear`` on ``[out, in]`` weights instead."""

    def forward(self, x):
        if self.as_linear:
            linear = torch.nn.functional.linear
            h = linear(x, self.conv1d_w.t(), self.conv1d_b)
            h = linear(linear(h, self.mm_w.t()), self.mat_w.t()).relu()
            return self.head(linear(linear(h, self.mat_t), self.mat_T))
        b, t, k = x.shape
        h = torch.addmm(self.conv1d_b, x.view(-1, k), self.conv1d_w)
        h = torch.mm(h, self.mm_w).view(b, t, -1)
        h = (h @ self.mat_w).relu()
        h = h @ self.mat_t.t()
        h = h @ self.mat_T.T
        return self.head(h)


@pytest.mark.parametrize("name", LOWP)
def test_every_linear_form_is_converted_and_gradients_reach_the_weights(name):
    """Regression (issue 11): GPT-2's Conv1D (``addmm`` with a ``[in, out]`` weight) matched
    no rule; ``mm`` and ``matmul`` with a parameter neither."""
    model = EveryForm()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    gm = tg.capture(model, (x,))
    report = tg.PassManager([name]).run(gm)
    expected = {"addmm": 1, "mm": 1, "matmul": 1, "matmul_t": 1, "matmul_T": 1}
    assert report.rule_matches[name] == {**dict.fromkeys(FORMS, 0), **expected}
    assert [s.module_fqn for s in report.skipped[name]] == ["head"]
    assert sqnr(gm(x), ref) > tg.get_handler(name)().sqnr_tolerance
    # Each form gives what nn.Linear layers on the [out, in] weights give under the same
    # handler, gradients included: they reach the parameters through the transpose.
    model.as_linear = True
    linear_gm = tg.capture(model, (x,))
    assert tg.PassManager([name]).run(linear_gm).matches == {name: 5}
    params = list(model.parameters())
    out, linear_out = gm(x), linear_gm(x)
    torch.testing.assert_close(out, linear_out)
    grads = torch.autograd.grad(out.square().sum(), params)
    for grad, linear_grad in zip(grads, torch.autograd.grad(linear_out.square().sum(), params)):
        torch.testing.assert_close(grad, linear_grad)


def test_in_out_weights_are_judged_as_out_in():
    """float8's shape rule sees ``[out, in]``: a Conv1D weight ``[in=32, out=24]`` fails
    on out_features 24, quoted as ``[24, 32]``."""

    class Conv1D(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = (
                torch.nn.Parameter(torch.randn(32, 24)),
                torch.nn.Parameter(torch.zeros(24)),
            )

        def forward(self, x):
            return torch.addmm(self.b, x, self.w).relu() + 1

    gm = tg.capture(Conv1D(), (torch.randn(4, 32),))
    (skipped,) = tg.get_handler("float8")().skipped(gm)
    assert "weight is [24, 32]" in skipped.reason


def test_a_weight_that_is_not_2d_is_skipped_with_the_reason():
    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 16, 16))  # stacked expert weights

        def forward(self, x):
            return torch.matmul(x, self.w).relu()

    gm = tg.capture(Experts(), (torch.randn(4, 8, 16),))
    (skipped,) = tg.get_handler("int8")().skipped(gm)
    assert skipped.reason == "weight is 3-D, expected [N, K]"


def test_activation_products_are_not_linear_layers():
    class Scores(torch.nn.Module):
        def forward(self, q, k):
            return torch.matmul(q, k.transpose(-1, -2)).softmax(-1)

    gm = tg.capture(Scores(), (torch.randn(2, 8, 16), torch.randn(2, 8, 16)))
    handler = tg.get_handler("int8")()
    assert handler.skipped(gm) == []  # not a layer: not "skipped" either
    assert [p.kind for p in tg.PassManager([handler]).check(gm)] == ["no_match"]


def test_the_head_is_found_by_structure_whatever_its_name():
    """Regression (issue 11): the default ``skip_fqns: ["output"]`` converted HF's
    ``lm_head`` and skipped BERT's ``attention.output.dense``. The head is what produces
    the logits: returned, or fed to the loss through reshapes, casts and soft-capping."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output = torch.nn.Linear(32, 32)  # named like a head, but is not one
            self.out = torch.nn.Linear(32, 16)

        def forward(self, x, labels):
            logits = torch.tanh(self.out(self.output(x).relu()) / 30.0) * 30.0
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    x, labels = torch.randn(2, 4, 32), torch.randint(0, 16, (2, 4))
    gm = tg.capture(Net(), (x, labels))
    report = tg.PassManager(["float8"]).run(gm)
    assert report.matches == {"float8": 1}
    (head,) = report.skipped["float8"]
    assert head.module_fqn == "out" and "produces the logits" in head.reason
    gm = tg.capture(Net(), (x, labels))
    assert tg.PassManager([{"float8": {"skip_head": False}}]).run(gm).matches == {"float8": 2}


def test_a_glob_matching_no_module_is_an_unmatched_filter():
    """Regression (issue 11): ``skip_fqns: [output]`` on a model whose head is ``out``
    matched nothing, silently."""
    gm = tiny_gm()
    problems = tg.PassManager([{"int8": {"skip_fqns": ["outptu", "attention"]}}]).check(gm)
    (problem,) = problems
    assert problem.kind == "unmatched_filter" and problem.handlers == ("int8",)
    assert "skip_fqns glob 'outptu' matches no module" in problem.message
    assert "did you mean 'output'" in problem.message


def test_a_rule_glob_matching_no_module_is_an_unmatched_filter():
    class Narrow(tg.Handler):
        @tg.rule(include=["layers.*.feed_forwrd.*"])
        def relu(x):
            return aten.silu.default(x)

        @relu.replacement
        def _(x):
            return aten.mul.Tensor(x, aten.sigmoid.default(x))

    problems = tg.PassManager([Narrow]).check(tiny_gm())
    unmatched = [p for p in problems if p.kind == "unmatched_filter"]
    assert len(unmatched) == 1 and unmatched[0].rule == "relu"
    assert "rule 'relu' include= glob 'layers.*.feed_forwrd.*'" in unmatched[0].message


def test_check_exits_1_on_an_unmatched_filter(tmp_path, capsys):
    import json

    from torchgraft.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        'model:\n  factory: "torchgraft.models:build_llama"\n  kwargs: {preset: tiny}\n'
        "  inputs:\n    - {shape: [2, 16], dtype: int64, high: 256}\n"
        "handlers:\n  - int8: {skip_fqns: [out]}\n"
    )
    assert main(["check", str(config), "--json"]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["kind"] == "unmatched_filter"
    assert "did you mean 'output'" in problem["message"]
    assert problem["source"].startswith(str(config))  # the config line of the handler
