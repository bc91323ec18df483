"""Verify tells the truth: a gradient that is zero in exact arithmetic raises no alarm, each
handler is judged alone as well as on its step, and a handler that computes a different
function on purpose says so."""

from __future__ import annotations

import passes_handlers  # noqa: F401  (registers the t_* handlers)
import pytest
import torch

import torchgraft as tg
from torchgraft.handlers.base import HandlerDefinitionError
from torchgraft.handlers.linear_rules import LinearHandler
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ir.rewriter import GraphEditor, RuleApplier
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.passes.calibrate import NoisyInterpreter, Rewritten, regions
from torchgraft.passes.verify import Verifier, judged_sqnr, scale_floors
from torchgraft.tools.graph_copy import run_on_copy

aten = torch.ops.aten


@pytest.fixture(scope="module")
def bert():
    """A tiny transformers BERT (SiLU FFN): its key-projection biases get zero gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        hidden_act="silu",
        attn_implementation="sdpa",
    )
    model = transformers.BertForMaskedLM(config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return tg.capture(model, (ids,)), ids


def test_a_gradient_zero_in_exact_arithmetic_raises_no_alarm(bert):
    gm, ids = bert
    key_bias = "gradient of bert.encoder.layer.0.attention.self.key.bias"
    before = Verifier(gm, (ids,)).reference
    after = Verifier(run_on_copy(gm, ["t_silu"])[0], (ids,)).reference
    floors = scale_floors(before)
    # the reference is rounding noise: compared with itself it reads as a failure ...
    assert (
        before[key_bias].norm()
        < 1e-9 * before["gradient of bert.embeddings.word_embeddings.weight"].norm()
    )
    assert sqnr(after[key_bias], before[key_bias]) < 20
    # ... judged against the rounding level of all gradients, it is exact
    assert judged_sqnr(after[key_bias], before[key_bias], floors[key_bias]) > 100
    # a value above the rounding level keeps its own scale, even a small one (the query
    # bias: 1e-3, four orders below the typical gradient here)
    query_bias = key_bias.replace("key", "query")
    assert floors[query_bias] < float(before[query_bias].norm()) < 1e-2
    for plan in (["t_silu"], [{"int8": {"skip_fqns": []}}]):
        result = tg.PassManager(plan).dry_run(gm, (ids,))
        assert result.problems == [], result


def test_int8_after_float8_is_judged_alone_too():
    model = build_llama("tiny", with_loss=True, seed=0)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(model, (tokens, tokens.clone()))
    plan = [
        {"float8": {"skip_fqns": ["output", "feed_forward"]}},
        {"int8": {"skip_fqns": ["output", "attention"]}},
    ]
    result = tg.PassManager(plan).dry_run(gm)
    assert result.problems == [], result
    int8 = result.report.sqnr["int8"]
    # on the graph float8 already made noisy its step reads below int8's tolerance; alone on
    # the original graph it is well above: the tolerance judges that, the step is held to
    # the noise already there
    assert int8.step_db < int8.tolerance_db == 26.0 < int8.alone_db
    assert int8.step_db >= result.report.sqnr["float8"].total_db
    text = str(result.report)
    assert "alone dB" in text and f"{int8.alone_db:.1f}" in text
    # int8 is calibrated alone too: on the original graph, its own places
    assert int8.calibrated_db is not None and int8.op_db >= int8.op_tolerance_db == 10.0
    assert "calibrated" in text and f"{int8.calibrated_db:.1f}" in text and "op tol" in text


def test_a_handler_is_refused_when_it_fails_alone():
    model = build_llama("tiny", seed=0)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    gm = tg.capture(model, (tokens,))

    class SiluInBfloat16(tg.Handler):
        sqnr_tolerance = 70.0

        @tg.rule
        def silu(x):
            return aten.silu.default(x)

        @silu.replacement
        def _(x):
            y = aten.silu.default(aten._to_copy.default(x, dtype=torch.bfloat16))
            return aten._to_copy.default(y, dtype=torch.float32)

    result = tg.PassManager(["t_low_precision_tolerant", SiluInBfloat16]).dry_run(gm)
    s = result.report.sqnr["SiluInBfloat16"]
    assert s.step_db >= result.report.sqnr["t_low_precision_tolerant"].total_db  # step passes
    assert s.alone_db < 70.0
    (p,) = result.problems
    assert p.kind == "numerics" and p.handlers == ("SiluInBfloat16",)
    assert "applied alone to the original graph" in p.message


class ReluToGelu(tg.Handler):
    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(x):
        return aten.gelu.default(x)


class DeclaredReluToGelu(ReluToGelu):
    approximates = False


def test_a_different_function_declares_what_it_is():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    gm = tg.capture(model, (torch.randn(4, 16),))
    (p,) = tg.PassManager([ReluToGelu]).check(gm)
    assert p.kind == "numerics" and "exact rewrite" in p.message
    report = tg.PassManager([DeclaredReluToGelu], verify=True).run(gm)
    s = report.sqnr["DeclaredReluToGelu"]
    assert s.step_db < 40 and s.tolerance_db == float("-inf")  # measured, held to none
    assert "none" in str(report)
    with pytest.raises(HandlerDefinitionError, match="keep one"):

        class Both(ReluToGelu):  # noqa: F841
            approximates = False
            sqnr_tolerance = 10.0


class ExactLinear(LinearHandler):
    """A 'quantizer' that computes F.linear itself (every linear form, as the real ones)."""

    sqnr_tolerance = 20.0
    op_sqnr_tolerance = 20.0

    def quantized_linear(self, x, w, b):
        return aten.linear.default(x, w, b)


@pytest.fixture(scope="module")
def tiny_llama():
    model = build_llama("tiny", seed=0)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return tg.capture(model, (tokens,))


def _rewritten(gm, handler) -> Rewritten:
    work = copy_graph_module(gm)
    editor = GraphEditor(work.graph)
    applier = RuleApplier(editor)
    records = [r for rule in handler.rules() for r in applier.apply(rule, handler, "h")]
    return Rewritten(gm, copy_graph_module(work, editor.is_live), regions(records, editor))


@pytest.mark.parametrize("handler", ["mx", "bitnet"])
def test_the_noisy_run_without_noise_is_the_original(tiny_llama, handler):
    """Calibration's run evaluates each rewritten place beside the exact nodes and passes on
    the exact values: with zero noise it reproduces the original graph, outputs and every
    parameter's gradient (none lost through the places), while it records each place's
    replacement error (forward and backward, with the real cotangent)."""
    rewritten = _rewritten(tiny_llama, tg.get_handler(handler)())
    interpreter = NoisyInterpreter(rewritten, torch.zeros_like)
    db, _ = Verifier(tiny_llama).judge(interpreter.run)
    assert db > 120
    assert len(interpreter.sites) == len(rewritten.regions) > 0
    for site in interpreter.sites:
        assert "output 0" in site.references and any("gradient" in k for k in site.references)
        assert any(
            sqnr(site.approximations[k], site.references[k]) < 40 for k in site.references
        )  # lossy ops: their error is what the noise is sized to


def test_an_exact_quantizer_calibrates_to_its_declared_tolerance(tiny_llama):
    s = tg.PassManager([ExactLinear], verify=True).run(copy_graph_module(tiny_llama)).sqnr
    (result,) = s.values()
    assert result.op_db > 100 and result.calibrated_db > 100  # no error: no noise
    assert result.tolerance_db == result.declared_db == 20.0


def test_op_sqnr_tolerance_needs_a_model_level_one():
    with pytest.raises(HandlerDefinitionError, match="without a sqnr_tolerance"):

        class NoModelLevel(ExactLinear):  # noqa: F841
            sqnr_tolerance = None

    with pytest.raises(HandlerDefinitionError, match="op_sqnr_tolerance must be a number"):

        class NotANumber(ExactLinear):  # noqa: F841
            op_sqnr_tolerance = "15"


def test_held_topk_choices_count_and_judge_the_rows_that_would_change():
    from torchgraft.passes.pinned_choices import RecordChoices, ReplayChoices

    scores = torch.tensor([[0.50, 0.49, 0.10, 0.00], [0.90, 0.10, 0.05, 0.00]])
    with RecordChoices() as recorder:
        torch.topk(scores, 1)
    nudged = scores + torch.tensor([[0.0, 0.02, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with ReplayChoices(recorder.choices) as replay:  # row 0 flips on a near tie
        values, index = torch.topk(nudged, 1)
    assert index.tolist() == [[0], [0]] and torch.equal(values, nudged[:, :1])
    assert (replay.changed, replay.unexplained, replay.aligned) == (1, 0, True)
    with ReplayChoices(recorder.choices) as replay:  # the smallest, from the same scores
        torch.topk(scores, 1, largest=False)
    assert (replay.changed, replay.unexplained) == (2, 2)
    with ReplayChoices(recorder.choices) as replay:  # another call count: not held
        torch.topk(scores, 1), torch.topk(scores, 1)
    assert not replay.aligned
