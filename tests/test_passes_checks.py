"""Every problem kind found on the exported tiny Llama, none on clean plans, and checks
that change nothing."""

from __future__ import annotations

import math

import passes_handlers  # noqa: F401  (registers the t_* handlers)
import pytest
import torch

import torchgraft as tg
from torchgraft.ir.unify import unifiable_nodes
from torchgraft.models import build_llama

aten = torch.ops.aten


@pytest.fixture(scope="module")
def model():
    return build_llama("tiny", seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gm(model, tokens):
    """Shared by the tests that only check (checks never change the graph)."""
    return tg.capture(model, (tokens,))


def check(gm, plan):
    return tg.PassManager(plan).check(gm)


def kinds(problems) -> list[str]:
    return [p.kind for p in problems]


@pytest.mark.parametrize(
    "plan",
    [
        ["t_fuse_rms", "t_silu", "t_linear_matmul"],
        ["t_linear_matmul", "t_matmul_back_after"],
        ["t_low_precision_tolerant", {"t_relu": {"optional": True}}],
        ["t_needs_rms", "t_fuse_rms"],
    ],
)
def test_clean_plans_have_no_problem(gm, plan):
    assert check(gm, plan) == []


def test_check_reports_matches_order_and_ops(gm):
    result = tg.PassManager(["t_silu", "t_fuse_rms"]).dry_run(gm)
    assert result.ok and result.order == ["t_silu", "t_fuse_rms"]
    assert result.matches == {"t_silu": 2, "t_fuse_rms": 5}
    assert result.report.rule_matches == {"t_silu": {"silu": 2}, "t_fuse_rms": {"rms": 5}}
    assert result.ops["torchgraft.rms_norm.default"] == 5
    assert "aten.silu.default" not in result.ops
    assert set(result.report.sqnr) == {"t_silu", "t_fuse_rms"}
    assert all(s.step_db > 80 for s in result.report.sqnr.values())


def test_overlap(gm):
    problems = check(gm, ["t_linear_matmul", {"t_low_precision_tolerant": {"optional": True}}])
    assert kinds(problems) == ["overlap"]
    (p,) = problems
    assert p.handlers == ("t_linear_matmul", "t_low_precision_tolerant")
    assert p.rule == "linear / linear"
    assert p.node == "linear" and "(and 14 more)" in p.message
    assert "llama.py" in p.source and "self.wq(x)" in p.source
    assert "module 'layers.0.attention.wq'" in p.message


def test_overlap_is_decided_by_the_filters_on_the_graph(gm):
    class OutputOnly(tg.Handler):
        @tg.rule(include=["output"])
        def linear(x, w):
            return aten.linear.default(x, w)

        @linear.replacement
        def _(x, w):
            return aten.matmul.default(x, aten.t.default(w))

    # the patterns unify, but the filters make the matches disjoint
    plan = [OutputOnly, {"t_low_precision_tolerant": {"skip_output": True}}]
    assert check(gm, plan) == []
    # without skip_output both rewrite the output projection
    (p,) = check(gm, [OutputOnly, "t_low_precision_tolerant"])
    assert p.kind == "overlap" and p.node == "linear_14" and "(and" not in p.message


def test_patterns_unify_statically():
    @tg.rule
    def linear(x, w):
        return aten.linear.default(x, w)

    @tg.rule
    def linear_of_relu(a, b):
        return aten.linear.default(aten.relu.default(a), b)

    @tg.rule
    def relu(a):
        return aten.relu.default(a)

    @tg.rule
    def add_relu_left(x, y):
        return aten.add.Tensor(aten.relu.default(x), y)

    @tg.rule
    def add_sigmoids(x, y):
        return aten.add.Tensor(aten.sigmoid.default(x), aten.sigmoid.default(y))

    @tg.rule
    def add_eps(x):
        return aten.add.Tensor(x, 1e-5)

    @tg.rule
    def add_other_eps(x):
        return aten.add.Tensor(x, 1e-6)

    @tg.rule
    def add_float(x, e: float):
        return aten.add.Tensor(x, e)

    @tg.rule
    def add_tensor(x, e: torch.Tensor):
        return aten.add.Tensor(x, e)

    @tg.rule
    def mul_relu_right(x, y):
        return aten.mul.Tensor(x, aten.sigmoid.default(y))

    @tg.rule(commutative=True)
    def mul_relu_left(x, y):
        return aten.mul.Tensor(aten.sigmoid.default(x), aten.relu.default(y))

    def pairs(a, b):
        return [(p.name, q.name) for p, q in unifiable_nodes(a, b)]

    assert pairs(linear, linear_of_relu) == [("linear_default", "linear_default")]
    assert pairs(linear_of_relu, relu) == [("relu_default", "relu_default")]
    assert pairs(linear, relu) == []
    assert pairs(add_sigmoids, add_relu_left) == []
    assert pairs(add_eps, add_other_eps) == []
    assert pairs(add_eps, add_float) == [("add_tensor", "add_tensor")]
    assert pairs(add_eps, add_tensor) == []  # a Tensor parameter cannot bind 1e-5
    # mul(sigmoid(x), relu(y)) vs mul(x, sigmoid(y)) unify only with commutativity
    both = [("sigmoid_default", "sigmoid_default"), ("mul_tensor", "mul_tensor")]
    assert pairs(mul_relu_left, mul_relu_right) == both
    mul_relu_left.commutative = frozenset()
    assert pairs(mul_relu_left, mul_relu_right) == both[:1]


def test_order(gm):
    problems = check(gm, ["t_matmul_back", "t_linear_matmul"])
    assert kinds(problems) == ["order", "no_match"]
    p = problems[0]
    assert p.handlers == ("t_matmul_back", "t_linear_matmul") and p.rule == "matmul"
    assert p.node.startswith("matmul") and "(and 14 more)" in p.message
    assert "never sees them" in p.message and "llama.py" in p.source
    # listing them the other way round fixes it (the reversed plan is a clobber instead)
    assert "order" not in kinds(check(gm, ["t_linear_matmul", "t_matmul_back"])[1:])


def test_order_is_not_reported_when_declared(gm):
    class MatmulBackFirst(passes_handlers.TMatmulBack):
        before = ("t_linear_matmul",)

    problems = check(gm, [{"t_linear_matmul": {}}, MatmulBackFirst])
    assert kinds(problems) == ["no_match"]  # runs first on purpose, finds no matmul


def test_clobber(gm):
    problems = check(gm, ["t_linear_matmul", "t_matmul_back"])
    assert "clobber" in kinds(problems)
    p = next(p for p in problems if p.kind == "clobber")
    assert p.handlers == ("t_linear_matmul", "t_matmul_back") and p.rule == "matmul"
    assert "which 't_linear_matmul' created (rule 'linear')" in p.message
    assert "after = ('t_linear_matmul',)" in p.message and "llama.py" in p.source
    # declared: not a clobber (test_clean_plans_have_no_problem)


def test_no_match_with_nearest_miss_and_optional(gm):
    (p,) = check(gm, ["t_relu"])
    assert p.kind == "no_match" and p.handlers == ("t_relu",)
    assert "the graph has no aten.relu.default node" in p.message
    assert check(gm, [{"t_relu": {"optional": True}}]) == []

    class SkipsEverything(tg.Handler):
        @tg.rule(where=lambda m: False)
        def linear(x, w):
            return aten.linear.default(x, w)

        @linear.replacement
        def _(x, w):
            return aten.linear.default(x, w)

    (p,) = check(gm, [SkipsEverything])
    assert p.kind == "no_match" and p.rule == "linear" and p.node == "linear"
    assert "15 aten.linear.default node(s), none matches" in p.message
    assert "where= predicate" in p.message and "llama.py" in p.source


def test_numerics(gm):
    (p,) = check(gm, ["t_low_precision"])
    assert p.kind == "numerics" and p.handlers == ("t_low_precision",)
    assert "below 80.0 dB required of an exact rewrite" in p.message
    result = tg.PassManager(["t_low_precision_tolerant"]).dry_run(gm)
    assert result.ok
    s = result.report.sqnr["t_low_precision_tolerant"]
    assert 25 < s.step_db < 60 and s.tolerance_db == 20.0


def test_numerics_judge_each_handler_on_its_own_step(gm):
    result = tg.PassManager(["t_low_precision_tolerant", "t_fuse_rms"]).dry_run(gm)
    assert result.ok
    lossy, exact = result.report.sqnr["t_low_precision_tolerant"], result.report.sqnr["t_fuse_rms"]
    # measured against the noisy graph before it, the exact rewrite is held to the noise
    # already there; alone on the original graph it is exact; the cumulative SQNR keeps the
    # first one's error
    assert exact.tolerance_db == 80 and lossy.total_db < 80
    assert min(exact.tolerance_db, lossy.total_db) < exact.step_db < 80 < exact.alone_db
    assert lossy.alone_db == lossy.step_db  # the first handler's step is itself alone
    assert math.isclose(exact.total_db, lossy.total_db, abs_tol=1.0)
    assert "alone dB" in str(result.report)


def test_numerics_see_gradients_that_stop_flowing(gm):
    class Detach(tg.Handler):
        sqnr_tolerance = 10.0

        @tg.rule(include=["layers.0.feed_forward.w1"])
        def linear(x, w):
            return aten.linear.default(x, w)

        @linear.replacement
        def _(x, w):
            return aten.linear.default(x, aten.detach.default(w))

    (p,) = check(gm, [Detach])
    assert p.kind == "numerics"
    assert "gradient of layers.0.feed_forward.w1.weight has SQNR 0.0 dB" in p.message


def test_rewrite_error_is_a_problem_not_an_exception(gm):
    class Broken(tg.Handler):
        @tg.rule
        def silu(x):
            return aten.silu.default(x)

        @silu.replacement
        def _(x):
            return aten.mm.default(x, x)  # wrong rank

    (p,) = check(gm, ["t_fuse_rms", Broken])
    assert p.kind == "rewrite_error" and p.handlers == ("Broken",) and p.rule == "silu"
    assert p.node == "silu" and "llama.py" in p.source


def test_plan_problems_are_reported_by_check_too(gm):
    problems = check(gm, ["t_fuse_rmss", {"t_low_precision": {"dtyp": 1}}, "t_silu", "t_silu"])
    assert kinds(problems) == ["unknown_handler", "bad_option", "duplicate"]


def _state(model, gm):
    return (
        gm.code,
        [(n.name, n.target, n.args, dict(n.meta)) for n in gm.graph.nodes],
        {n: (p, p.detach().clone(), p.grad) for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
    )


def test_check_changes_nothing(model, gm, tokens):
    before = _state(model, gm)
    out = gm(tokens)
    plan = ["t_linear_matmul", "t_matmul_back", "t_low_precision", "t_relu", "t_fuse_rms"]
    assert len(check(gm, plan)) >= 3
    after = _state(model, gm)
    assert after[0] == before[0] and after[1] == before[1]
    for name, (p, value, grad) in before[2].items():
        p2, value2, grad2 = after[2][name]
        assert p2 is p and torch.equal(value2, value) and grad2 is grad is None
    assert all(torch.equal(after[3][n], b) for n, b in before[3].items())
    assert torch.equal(gm(tokens), out)


def test_run_verifies_when_asked_and_rolls_back(model, tokens):
    gm = tg.capture(model, (tokens,))
    code = gm.code
    with pytest.raises(tg.CheckError, match="numerics") as info:
        tg.PassManager(["t_fuse_rms", "t_low_precision"], verify=True).run(gm)
    assert [p.kind for p in info.value.problems] == ["numerics"]
    assert gm.code == code
    report = tg.PassManager(["t_fuse_rms", "t_low_precision_tolerant"], verify=True).run(gm)
    assert report.matches == {"t_fuse_rms": 5, "t_low_precision_tolerant": 15}
    assert report.sqnr["t_low_precision_tolerant"].step_db > 20
    assert "SQNR dB" in str(report)


def test_run_refuses_what_check_reports_and_keeps_allowed_problems(model, tokens):
    gm = tg.capture(model, (tokens,))
    code = gm.code
    # one judge: every kind check reports stops run too, with the graph unchanged
    for plan, kind in [
        (["t_relu", "t_silu"], "no_match"),
        (["t_linear_matmul", {"t_low_precision_tolerant": {"optional": True}}], "overlap"),
        (["t_matmul_back", "t_linear_matmul"], "order"),
        (["t_linear_matmul", "t_matmul_back"], "clobber"),
    ]:
        with pytest.raises(tg.CheckError, match=rf"\[{kind}\]") as info:
            tg.PassManager(plan).run(gm)
        assert kind in kinds(info.value.problems)
        assert kinds(info.value.problems) == kinds(check(gm, plan))
        assert "allow: [" in str(info.value)
        assert gm.code == code
    report = tg.PassManager(["t_relu", "t_silu"], allow=["no_match"]).run(gm)
    assert report.matches == {"t_relu": 0, "t_silu": 2}
    assert kinds(report.problems) == ["no_match"]
    with pytest.raises(tg.CheckError, match="unknown_handler"):
        tg.PassManager(["nope"], allow=["no_match"]).run(gm)


def test_allowed_problems_pass_check_and_are_shown(gm):
    result = tg.PassManager(["t_relu", "t_silu"], allow=["no_match"]).dry_run(gm)
    assert result.ok and result.problems == [] and kinds(result.allowed) == ["no_match"]
    assert "allowed by the plan: 1 problem" in str(result)
    assert [p["kind"] for p in result.to_json()["allowed"]] == ["no_match"]
    assert (
        check(gm, ["t_relu"]) != [] and tg.PassManager(["t_relu"], allow="no_match").check(gm) == []
    )
    for bad, why in [("overlapp", "is not a problem kind"), ("cycle", "cannot be allowed")]:
        with pytest.raises(tg.TorchgraftError, match=f"allow: '{bad}' {why}"):
            tg.PassManager(["t_silu"], allow=[bad])


def test_verify_uses_given_inputs_and_reports_unrunnable_graphs(gm, tokens):
    result = tg.PassManager(["t_silu"], inputs=(tokens,)).dry_run(gm)
    assert result.ok
    bad = (torch.zeros(2, 32),)  # float tokens: embedding refuses them
    (p,) = tg.PassManager(["t_silu"]).check(gm, inputs=bad)
    assert p.kind == "numerics" and "could not run before rewriting" in p.message


def test_an_option_the_graph_refuses_is_a_bad_option(gm):
    from torchgraft.handlers.options import OptionError

    class NeedsIds(tg.Handler):
        @tg.rule
        def silu(x):
            return aten.silu.default(x)

        @silu.replacement
        def _(x):
            return aten.silu.default(x)

        def reject(self, match):
            raise OptionError("no graph input named 'ids'", handler="NeedsIds", option="input")

    (p,) = check(gm, [NeedsIds])
    assert p.kind == "bad_option" and p.handlers == ("NeedsIds",)
    assert "no graph input named 'ids'" in p.message


def test_assert_plan_clean(gm):
    result = tg.testing.assert_plan_clean(gm, ["t_silu"])
    assert result.matches == {"t_silu": 2}
    with pytest.raises(AssertionError, match=r"(?s)plan has problems\n.*\[no_match\] t_relu"):
        tg.testing.assert_plan_clean(gm, ["t_relu"])
