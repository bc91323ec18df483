"""Rules are checked when declared: bad patterns and replacements fail early and clearly."""

from __future__ import annotations

import pytest
import torch

import torchgraft as tg

aten = torch.ops.aten


def test_rule_works_bare_and_with_keywords():
    @tg.rule
    def bare(x):
        return aten.relu.default(x)

    @tg.rule(name="named", exclude=["output"])
    def keyworded(x):
        return aten.relu.default(x)

    assert isinstance(bare, tg.Rule) and bare.name == "bare"
    assert keyworded.name == "named" and keyworded.exclude == ("output",)
    assert "test_rule_definition.py:" in bare.location


def test_replacement_must_accept_every_bound_name():
    @tg.rule
    def pat(x, w):
        return aten.linear.default(x, w)

    with pytest.raises(
        tg.RuleDefinitionError, match=r"does not accept the pattern's parameters \['w'\]"
    ):

        @pat.replacement
        def _(x):
            return x

    with pytest.raises(
        tg.RuleDefinitionError, match=r"parameters \['y'\] that the pattern does not bind"
    ):

        @pat.replacement
        def _(x, w, y):
            return x


def test_unused_parameter_and_opless_pattern_rejected():
    with pytest.raises(tg.RuleDefinitionError, match=r"parameters \['unused'\] are never used"):

        @tg.rule
        def pat(x, unused):
            return aten.relu.default(x)

    with pytest.raises(tg.RuleDefinitionError, match="calls no op"):

        @tg.rule
        def identity(x):
            return x


def test_pattern_with_control_flow_reports_tracing_error():
    with pytest.raises(tg.RuleDefinitionError, match="could not be traced"):

        @tg.rule
        def branchy(x):
            if x.sum() > 0:
                return aten.relu.default(x)
            return aten.neg.default(x)


def test_disconnected_outputs_rejected():
    with pytest.raises(tg.RuleDefinitionError, match="share no node"):

        @tg.rule
        def two(x, y):
            return aten.relu.default(x), aten.neg.default(y)


def test_replacement_output_count_checked():
    class TwoOut(tg.Handler):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

        @relu.replacement
        def _(x):
            return aten.relu.default(x), aten.neg.default(x)

    gm = tg.capture(torch.nn.ReLU(), (torch.randn(4),))
    with pytest.raises(tg.RewriteError, match="returned 2 values, the pattern has 1 outputs"):
        tg.PassManager([TwoOut]).run(gm)


def test_parameters_named_like_fx_builtins_bind_by_their_own_name():
    # fx renames a placeholder called ``device`` (``device_1``); bindings keep the parameter name
    @tg.rule
    def to_device(x: torch.Tensor, dtype, device: torch.device):
        return aten.to.dtype_layout(x, dtype=dtype, device=device)

    assert to_device.pattern.params == ["x", "dtype", "device"]
    assert to_device.pattern.annotations["device"] is torch.device


def test_replacement_binds_by_position_like_replace_pattern(llama_gm, tokens):
    class ByPosition(tg.Handler):
        @tg.rule
        def linear(x, w):
            return aten.linear.default(x, w)

        @linear.replacement
        def _(inp, weight):  # other names, same order: bound by position
            return aten.matmul.default(inp, aten.t.default(weight))

    ref = llama_gm(tokens)
    report = tg.PassManager([ByPosition]).run(llama_gm)
    assert report.matches["ByPosition"] > 0 and ByPosition.linear.argument_names == {
        "x": "inp",
        "w": "weight",
    }
    torch.testing.assert_close(llama_gm(tokens), ref)


def test_replacement_binds_by_name_in_any_order():
    @tg.rule
    def pat(x, w):
        return aten.linear.default(x, w)

    @pat.replacement
    def _(w, x):
        return aten.matmul.default(x, aten.t.default(w))

    assert pat.argument_names == {"x": "x", "w": "w"}


def test_replacement_naming_a_parameter_at_another_position_is_refused():
    @tg.rule
    def pat(x, w):
        return aten.linear.default(x, w)

    with pytest.raises(tg.RuleDefinitionError, match=r"by name, or by position with 2 parameters"):

        @pat.replacement
        def _(w, bias):
            return w


def test_a_subclass_rule_overrides_the_base_rule_of_that_name(llama_gm):
    class Base(tg.Handler):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

        @relu.replacement
        def _(x):
            return aten.gelu.default(x)

        @tg.rule
        def silu(x):
            return aten.silu.default(x)

        @silu.replacement
        def _(x):
            return aten.gelu.default(x)

    class Derived(Base):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

        @relu.replacement
        def _(x):
            return aten.clamp_min.default(x, 0.0)

    class WithoutSilu(Base):
        silu = None

    assert [r.name for r in Base.rules()] == ["relu", "silu"]
    assert Derived.rules() == [Derived.relu, Base.silu]  # overridden in the base rule's place
    assert WithoutSilu.rules() == [Base.relu]
    report = tg.PassManager([Derived]).run(llama_gm)  # the tiny Llama: SiLU, no ReLU
    assert report.rule_matches == {"Derived": {"relu": 0, "silu": 2}}
    with pytest.raises(tg.CheckError, match="no_match|rewrote nothing"):
        tg.PassManager([WithoutSilu]).run(llama_gm)
