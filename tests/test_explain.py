"""``explain`` on deliberately failing rules: one per failure reason, each with its hint."""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_rules import FuseRMSNorm, LinearViaMatmul

import torchgraft as tg
from torchgraft.ir.matcher import FAILURE_KINDS
from torchgraft.models import build_llama
from torchgraft.tools import explain as ex

aten = torch.ops.aten


@pytest.fixture(scope="module")
def gm():
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return tg.capture(build_llama("tiny", seed=0), (tokens,))


def _handler(rule: tg.Rule, reject=None) -> type[tg.Handler]:
    """A handler class with one rule (and an optional ``reject``)."""
    rule.replacement(lambda **kw: aten.clone.default(next(iter(kw.values()))))
    body = {"demo": rule}
    if reject is not None:
        body["reject"] = lambda self, m: reject(m)
    return type("Demo", (tg.Handler,), body)


def wrong_op(x, w):
    return aten.linear.default(aten.relu.default(x), w)


def literal(x):
    return aten.pow.Tensor_Scalar(x, 3)


def annotated(x, w: float):
    return aten.linear.default(x, w)


def bound_twice(x):
    return aten.linear.default(x, x)


def internal_used_outside(x, w, v):
    return aten.linear.default(aten.mul.Tensor(x, w), v)


def plain_linear(x, w):
    return aten.linear.default(x, w)


CASES = [
    # (rule, reject, node, kind, words in the reason)
    (tg.rule(wrong_op), None, "linear", "wrong_op",
     ["argument 0 ('input')", "expected aten.relu.default", "aten.mul.Tensor"]),
    (tg.rule(literal), None, "pow_1", "literal_mismatch", ["expected literal 3, found 2"]),
    (tg.rule(annotated), None, "linear", "annotation_mismatch",
     ["parameter 'w' is annotated", "float", "layers_0_attention_wq_weight"]),
    (tg.rule(bound_twice), None, "linear", "parameter_bound_twice",
     ["parameter 'x' is bound to 'mul_1'", "layers_0_attention_wq_weight"]),
    (tg.rule(internal_used_outside), None, "linear", "internal_node_used_outside",
     ["internal node 'mul_1' is also used by 'linear_1'"]),
    (tg.rule(plain_linear, include=["layers.1.*"]), None, "linear", "include_glob",
     ["module 'layers.0.attention.wq' is not in include=['layers.1.*']"]),
    (tg.rule(plain_linear, exclude=["out*"]), None, "linear_14", "exclude_glob",
     ["module 'output' is excluded by exclude glob 'out*'"]),
    (tg.rule(plain_linear), lambda m: "wq is skipped", "linear", "handler_reject",
     ["rejects it: wq is skipped"]),
    (tg.rule(plain_linear, where=lambda m: m["w"].shape[0] > 64), None, "linear",
     "where_predicate", ["where= predicate of rule 'demo' returned False"]),
    (tg.rule(plain_linear, where=lambda m: 1 / 0), None, "linear", "filter_raised",
     ["ZeroDivisionError"]),
    (tg.rule(plain_linear), None, "embedding", "wrong_anchor",
     ["ends in aten.linear.default", "aten.embedding.default"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "reject", "node", "kind", "words"), CASES, ids=[c[3] for c in CASES]
)
def test_each_failure_reason_is_explained_with_a_hint(gm, rule, reject, node, kind, words):
    (explanation,) = ex.explain_plan(gm, _handler(rule, reject), node=node)
    (result,) = explanation.nodes
    assert (result.node, result.kind, result.matched) == (node, kind, False)
    for word in words:
        assert word in result.reason
    assert result.hint and "llama.py:" in result.source
    text = ex.format_explanation(explanation)
    assert f"{node} [" in text and f"does not match: {kind.replace('_', ' ')}" in text
    assert result.reason in text and result.hint in text


def test_every_failure_kind_has_a_hint():
    assert set(ex.HINTS) == {*FAILURE_KINDS, "filter_raised"}
    assert all(ex.HINTS.values())
    untested_on_llama = {
        "list_mismatch", "argument_count", "pattern_shares_node", "graph_shares_node",
        "output_not_found", "parameter_binds_pattern_op",
    }  # fmt: skip
    assert set(ex.HINTS) - {case[3] for case in CASES} == untested_on_llama


def test_literal_hint_says_to_make_it_a_parameter():
    assert "making it a pattern parameter" in ex.HINTS["literal_mismatch"]


def test_module_glob_selects_candidates_and_reports_matches(gm):
    (explanation,) = ex.explain_plan(gm, LinearViaMatmul, module="layers.1.feed_forward")
    assert [n.node for n in explanation.nodes] == ["linear_11", "linear_12", "linear_13"]
    assert all(n.kind == "match" and n.matched for n in explanation.nodes)
    assert "3 candidate node(s), 3 rewritten" in ex.format_explanation(explanation)
    (none,) = ex.explain_plan(gm, LinearViaMatmul, module="no.such.module")
    assert none.nodes == [] and "no node computes" in ex.format_explanation(none)


def test_overlapping_match_is_not_rewritten():
    class Negs(torch.nn.Module):
        def forward(self, x):
            return x.neg().neg().neg()

    small = tg.capture(Negs(), (torch.ones(3),))
    (explanation,) = ex.explain_plan(
        small, _handler(tg.rule(lambda x: aten.neg.default(aten.neg.default(x))))
    )
    kinds = [(n.node, n.kind) for n in explanation.nodes]
    assert kinds == [("neg", "wrong_op"), ("neg_1", "match"), ("neg_2", "overlap")]
    assert "'neg_1'" in explanation.nodes[2].reason


def test_earlier_handlers_run_first(gm):
    # After FuseRMSNorm, the q projection's input is the fused op: the rule still matches.
    (explanation,) = ex.explain_plan(gm, LinearViaMatmul, node="linear", earlier=[FuseRMSNorm])
    assert explanation.nodes[0].kind == "match"
    with pytest.raises(tg.TorchgraftError, match="replaced by handler 'FuseRMSNorm' rule 'rms'"):
        ex.explain_plan(gm, LinearViaMatmul, node="mul_1", earlier=[FuseRMSNorm])


def test_unknown_rule_or_node_suggests_names(gm):
    with pytest.raises(tg.TorchgraftError, match="did you mean 'linear'"):
        ex.explain_plan(gm, LinearViaMatmul, rule="liner")
    with pytest.raises(tg.TorchgraftError, match="did you mean 'linear_1"):
        ex.explain_plan(gm, LinearViaMatmul, node="linear_1x")
    with pytest.raises(tg.TorchgraftError, match="not both"):
        ex.explain_plan(gm, LinearViaMatmul, module="layers.0", node="linear")


def test_cli_entry_explains_a_handler_of_the_plan(gm, capsys):
    parser = argparse.ArgumentParser()
    ex.add_arguments(parser)
    args = parser.parse_args(["--handler", "LinearViaMatmul", "--module", "output"])
    assert ex.main(args, gm, [FuseRMSNorm, LinearViaMatmul]) == 0
    out = capsys.readouterr().out
    assert (
        "handler 'LinearViaMatmul', rule 'linear'" in out and "linear_14 [output]: matches" in out
    )
    with pytest.raises(SystemExit):  # --module and --node exclude each other
        parser.parse_args(["--handler", "x", "--module", "a", "--node", "b"])
