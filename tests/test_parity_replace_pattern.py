"""Parity with ``torch.fx.subgraph_rewriter.replace_pattern`` and ``SubgraphMatcher``.

Each case restates what one of PyTorch's own rewriter / matcher tests checks
(``test/fx/test_subgraph_rewriter.py``, ``test/fx/test_matcher_utils.py``) and runs it both
ways on identical ``symbolic_trace`` graphs: same number of matches, same outputs. Where
torchgraft differs on purpose (a replacement that changes the shape or dtype of what it
replaces is refused unless the rule says ``check_outputs=False``), the case checks both.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher
from torch.fx.subgraph_rewriter import replace_pattern

import torchgraft as tg

aten = torch.ops.aten


def traced(root, *inputs) -> fx.GraphModule:
    """``symbolic_trace`` plus the fake values torchgraft's replacements are traced with."""
    gm = fx.symbolic_trace(root)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return gm


def ours(gm, pattern, replacement, **options) -> int:
    rule = tg.rule(pattern, name="parity", **options)
    rule.replacement(replacement)
    plan = type("Parity", (tg.Handler,), {"parity": rule})
    return tg.PassManager([plan], allow=["no_match"]).run(gm).matches["Parity"]  # 0 is a result


def check(root, pattern, replacement, inputs, *, matches, expected=None, **options):
    """Rewrite two identical graphs both ways; same match count, same outputs."""
    mine, theirs = traced(root, *inputs), traced(root, *inputs)
    assert ours(mine, pattern, replacement, **options) == matches
    assert len(replace_pattern(theirs, pattern, replacement)) == matches
    mine.graph.lint()
    got, want = mine(*inputs), theirs(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if expected is not None:
        torch.testing.assert_close(got, expected(*inputs), rtol=0, atol=0)
    return mine


def refused(root, pattern, replacement, inputs, match: str):
    gm = traced(root, *inputs)
    code = gm.code
    with pytest.raises(tg.RewriteError, match=match):
        ours(gm, pattern, replacement)
    assert gm.code == code


X = (torch.randn(3, 4),)


class NegPlusRelu(nn.Module):
    def forward(self, x):
        val = torch.neg(x) + torch.relu(x)
        return torch.add(val, val)


def neg_plus_relu(x):
    return torch.neg(x) + torch.relu(x)


def test_pattern_replaced_by_itself_keeps_logic():
    check(NegPlusRelu(), neg_plus_relu, neg_plus_relu, X, matches=1, expected=NegPlusRelu())


def test_one_op_pattern():
    class M(nn.Module):
        def forward(self, x):
            val = torch.neg(x)
            return torch.add(val, val)

    def expected(x):
        return torch.relu(x) * 2

    check(M(), lambda x: torch.neg(x), lambda x: torch.relu(x), X, matches=1, expected=expected)


def test_two_op_pattern_single_match():
    def expected(x):
        return torch.relu(x) + torch.relu(x)

    check(NegPlusRelu(), neg_plus_relu, lambda x: torch.relu(x), X, matches=1, expected=expected)


def test_multiple_matches_refused_when_the_shape_changes_then_allowed():
    class M(nn.Module):
        def forward(self, x, w1, w2):
            m1 = torch.cat([w1, w2]).sum()
            m2 = torch.cat([w1, w2]).sum()
            return x + torch.max(m1) + torch.max(m2)

    def pattern(w1, w2):
        return torch.cat([w1, w2]).sum()

    def replacement(w1, w2):
        return torch.stack([w1, w2])  # [2, 1, 3] for a scalar: changes the shape

    inputs = (torch.rand(1, 3), torch.rand(1, 3), torch.rand(1, 3))
    refused(M(), pattern, replacement, inputs, r"is \[2, 1, 3\] float32 .* which is \[\] float32")
    check(M(), pattern, replacement, inputs, matches=2, check_outputs=False)


def test_graph_argument_order_is_kept():
    class M(nn.Module):
        def forward(self, x, y):
            return torch.mm(x, y)

    def mm(x, y):
        return torch.mm(x, y)

    inputs = (torch.randn(3, 4), torch.randn(4, 5))
    check(M(), mm, mm, inputs, matches=1, expected=torch.mm)


def test_only_the_matched_output_is_replaced():
    class M(nn.Module):
        def forward(self, x, y):
            val = torch.neg(y) + torch.relu(x)
            return torch.add(val, val)

    def expected(x, y):
        val = torch.neg(y) + torch.neg(x)
        return val + val

    inputs = (torch.randn(4, 4), torch.randn(4, 4))
    check(
        M(), lambda x: torch.relu(x), lambda x: torch.neg(x), inputs, matches=1, expected=expected
    )


def test_graph_modules_as_pattern_and_replacement():
    class Pattern(nn.Module):
        def forward(self, x):
            return torch.neg(x) + torch.relu(x)

    class Replacement(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    def expected(x):
        return torch.sigmoid(x) * 2

    pattern, replacement = fx.symbolic_trace(Pattern()), fx.symbolic_trace(Replacement())
    check(NegPlusRelu(), pattern, replacement, X, matches=1, expected=expected)


def test_pattern_that_is_the_entire_graph():
    class M(nn.Module):
        def forward(self, x):
            a = torch.neg(x)
            return torch.add(a, a)

    def pattern(x):
        a = torch.neg(x)
        return torch.add(a, a)

    def replacement(x):
        a = torch.sigmoid(x)
        return torch.cat([a, a])  # [6, 4] for [3, 4]

    refused(M(), pattern, replacement, X, r"is \[6, 4\] float32 .* which is \[3, 4\] float32")
    check(M(), pattern, replacement, X, matches=1, expected=replacement, check_outputs=False)


def test_pattern_output_may_have_users_outside_the_match():
    class M(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return torch.neg(y) - y

    def expected(x):
        y = torch.sigmoid(x)
        return torch.neg(y) - y

    check(M(), lambda x: torch.relu(x), lambda x: torch.sigmoid(x), X, matches=1, expected=expected)


def test_internal_nodes_with_outside_users_do_not_match():
    class M(nn.Module):
        def forward(self, x, w1, w2, b1, b2):
            m1 = torch.cat([w1, w2])
            m2 = torch.cat([x, b2])
            t0 = torch.addmm(b1, m1, m2.t())
            t1 = torch.sum(w1, 1)
            return torch.sum(t1), torch.sum(t0), m1.sum()  # m1 is used outside

    def pattern(x, w1, w2, b1, b2):
        m1 = torch.cat([w1, w2])
        m2 = torch.cat([x, b2])
        return torch.addmm(b1, m1, m2.t())

    def replacement(x, w1, w2, b1, b2):
        return torch.cat([x, w1, w2])

    x, w1, w2, b2 = (torch.randn(2, 3) for _ in range(4))
    check(M(), pattern, replacement, (x, w1, w2, torch.randn(4, 4), b2), matches=0)


def test_placeholder_binds_a_computed_value_and_dtype_change_is_explicit():
    class M(nn.Module):
        def forward(self, x):
            x = x + 3
            x = x.dequantize()
            x = torch.sigmoid(x)
            return x.to(torch.float16)

    def pattern(x):
        return torch.sigmoid(x.dequantize()).to(torch.float16)

    def replacement(x):
        return x

    refused(M(), pattern, replacement, X, r"is \[3, 4\] float32 .* which is \[3, 4\] float16")
    check(M(), pattern, replacement, X, matches=1, expected=lambda x: x + 3, check_outputs=False)


def test_module_pattern_matches_submodules_by_class():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sigmoid = nn.Sigmoid()
            self.submod = nn.ReLU()

        def forward(self, x):
            return self.submod(self.sigmoid(x + 1))

    class Pattern(nn.Module):
        def __init__(self, names=("sigmoid", "submod")):
            super().__init__()
            self.names = names
            self.add_module(names[0], nn.Sigmoid())
            self.add_module(names[1], nn.ReLU())

        def forward(self, x):
            first, second = (getattr(self, n) for n in self.names)
            return second(first(x))

    class Replacement(nn.Module):
        def __init__(self):
            super().__init__()
            self.tanh = nn.Tanh()
            self.submod = nn.ReLU()

        def forward(self, x):
            return self.submod(self.tanh(x))

    def expected(x):
        return torch.relu(torch.tanh(x + 1))

    gm = check(M(), Pattern(), Replacement(), X, matches=1, expected=expected)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # computations inlined
    # replace_pattern matches submodules by attribute name; torchgraft by class.
    renamed = Pattern(("act", "out"))
    theirs = traced(M(), *X)
    assert replace_pattern(theirs, renamed, Replacement()) == []
    gm = traced(M(), *X)
    assert ours(gm, renamed, Replacement()) == 1
    torch.testing.assert_close(gm(*X), expected(*X), rtol=0, atol=0)


def test_consecutive_matches():
    def f(x):
        return torch.sigmoid(torch.sigmoid(torch.sigmoid(x)))

    def expected(x):
        return torch.exp(torch.exp(torch.exp(x)))

    check(f, lambda x: torch.sigmoid(x), lambda x: torch.exp(x), X, matches=3, expected=expected)


def test_overlapping_matches_keep_the_earliest():
    def f(x):
        return torch.sigmoid(torch.sigmoid(torch.sigmoid(torch.sigmoid(x))))

    def pattern(x):
        return torch.sigmoid(torch.sigmoid(x))

    def expected(x):
        return torch.neg(torch.neg(x))

    check(f, pattern, lambda x: torch.neg(x), X, matches=2, expected=expected)


def test_multiple_outputs():
    def f(x):
        return torch.sigmoid(x) + torch.relu(x)

    def pattern(a):
        return torch.sigmoid(a), torch.relu(a)

    def replacement(x):
        return torch.exp(x), torch.abs(x)

    def expected(x):
        return torch.exp(x) + torch.abs(x)

    check(f, pattern, replacement, X, matches=1, expected=expected)


def test_duplicated_outputs():
    def f(x1, x2):
        x = x1 - x2
        return torch.sigmoid(x) + torch.relu(x)

    def pattern(a1, a2):
        a = a1 - a2
        return torch.sigmoid(a), torch.relu(a), a

    def replacement(x1, x2):
        y2 = torch.abs(x2)
        return y2, y2, torch.exp(x1)

    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    check(f, pattern, replacement, inputs, matches=1, expected=lambda x1, x2: 2 * torch.abs(x2))


def test_unused_graph_inputs_stay():
    class M(nn.Module):
        def forward(self, x, y, z):
            return x + y

    inputs = tuple(torch.randn(3, 4) for _ in range(3))
    gm = check(
        M(),
        lambda x, y: x + y,
        lambda x, y: x - y,
        inputs,
        matches=1,
        expected=lambda x, y, z: x - y,
    )
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 3


def test_method_call_chain():
    class M(nn.Module):
        def forward(self, x):
            return x.dequantize().sigmoid().to(torch.float16)

    def pattern(x):
        return x.dequantize().sigmoid().to(torch.float16)

    def replacement(x):
        return x.sigmoid().half()  # same dtype: no escape hatch needed

    check(M(), pattern, replacement, X, matches=1, expected=replacement)


def wrapped_linear_mul(a, b, bias, c):
    lin = nn.functional.linear(a, b, bias=bias)
    return lin, lin * c


fx.wrap("wrapped_linear_mul")


def linear_mul_pattern(a, b, bias, c):
    lin = nn.functional.linear(a, b, bias=bias)
    return lin, c * lin


def linear_mul_replacement(a, b, bias, c):
    lin, mul = wrapped_linear_mul(a, b, bias, c)
    return lin, mul


class LinearChains(nn.Module):
    """Three candidate anchors; the second one's multiply is not by an input."""

    def __init__(self):
        super().__init__()
        for i in range(5):
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(8, 8)))
            self.register_parameter(f"b{i}", nn.Parameter(torch.randn(8)))

    def forward(self, in0, in1):
        lin2 = nn.functional.linear(
            nn.functional.linear(in1, self.w0, bias=self.b0), self.w1, bias=self.b1
        )
        sum1 = in1 * lin2 + in1
        lin3 = nn.functional.linear(sum1, self.w2, bias=self.b2)
        mul2 = lin3 * torch.sigmoid(lin3)
        lin5 = nn.functional.linear(
            nn.functional.linear(in0, self.w3, bias=self.b3), self.w4, bias=self.b4
        )
        return torch.cat([mul2, in0 * lin5 + in0], dim=1)


def test_wrapped_replacement_with_keyword_arguments_is_one_call():
    inputs = (torch.randn(2, 8), torch.randn(2, 8))
    gm = check(LinearChains(), linear_mul_pattern, linear_mul_replacement, inputs, matches=2)
    assert [n.target for n in gm.graph.nodes].count(wrapped_linear_mul) == 2


def test_literal_filters_by_annotation_like_replace_pattern_with_filters():
    class M(nn.Module):
        def forward(self, x):
            y = torch.relu(torch.add(x, 2))
            return torch.relu(torch.add(y, y + 1))

    def pattern(x, num):
        return torch.relu(torch.add(x, num))

    def scalar_pattern(x, num: float):
        return torch.relu(torch.add(x, num))

    def replacement(x, num):
        return torch.mul(x, num)

    check(M(), pattern, replacement, X, matches=2)
    gm = traced(M(), *X)
    assert ours(gm, scalar_pattern, replacement) == 1
    x = X[0]
    torch.testing.assert_close(gm(x), torch.relu(torch.add(x * 2, x * 2 + 1)))


def test_list_arguments_are_literals_of_the_match():
    class M(nn.Module):
        def forward(self, x):
            return aten._reshape_alias_copy.default(x, [1, 2], [3, 4])

    def pattern(x, size, stride):
        return aten._reshape_alias_copy.default(x, size, stride)

    def replacement(x, size, stride):
        return aten._reshape_alias_copy.default(x, stride, size)

    inputs = (torch.randn(16),)
    gm = check(M(), pattern, replacement, inputs, matches=1, check_outputs=False)
    assert "_reshape_alias_copy.default(x, [3, 4], [1, 2])" in gm.code


def test_module_attributes_in_pattern_and_replacement():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.tensor([1.0])
            self.b = torch.tensor([2.0])

        def forward(self, x):
            return x + self.a - self.b

    class Pattern(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.tensor([7.0])  # matches any attribute

        def forward(self, x):
            return x + self.a

    class Replacement(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.tensor([3.0])

        def forward(self, x):
            return x - self.c

    gm = check(M(), Pattern(), Replacement(), X, matches=1, expected=lambda x: x - 3.0 - 2.0)
    assert torch.equal(
        gm.get_buffer("c") if "c" in dict(gm.named_buffers()) else gm.c, torch.tensor([3.0])
    )


def test_clamp_keywords_are_not_confused():
    class M(nn.Module):
        def forward(self, x):
            return torch.clamp(x, max=0.0) + torch.clamp(x, 0.0, 1.0)

    def pattern(x):
        return torch.clamp(x, min=0.0)

    def expected(x):
        return torch.clamp(x, max=0.0) + torch.clamp(x, 0.0, 1.0)

    # Neither call is clamp(min=0) alone: no match, like replace_pattern.
    check(M(), pattern, lambda x: torch.relu(x), X, matches=0, expected=expected)


def test_in_place_replacement_keeps_graph_metadata():
    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    gm = traced(M(), torch.randn(2, 3))
    x = next(iter(gm.graph.nodes))
    with pytest.raises(tg.RewriteError, match=r"\[3, 2\] float32 .* \[2, 3\] float32"):
        ours(gm, lambda x: torch.relu(x), lambda x: x.transpose_(0, 1))
    assert x.meta["val"].shape == (2, 3)


# --- SubgraphMatcher cases: match counts only ------------------------------------------


def _count(graph_root, pattern) -> tuple[int, int]:
    """(torchgraft's, SubgraphMatcher's) number of matches of ``pattern`` in the graph."""
    gm = fx.symbolic_trace(graph_root)
    rule = tg.rule(pattern, name="count")
    mine = len(tg.find_matches(gm.graph, rule))
    pattern_graph = fx.symbolic_trace(pattern).graph
    theirs = len(SubgraphMatcher(pattern_graph, remove_overlapping_matches=True).match(gm.graph))
    return mine, theirs


def test_matcher_attributes_match_any_attribute():
    class Large(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 3))
            self.bias = nn.Parameter(torch.ones(3, 3))

        def forward(self, x):
            return aten.addmm.default(self.bias, x, self.weight)

    class Pattern(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(5, 5))
            self.b = nn.Parameter(torch.ones(5, 5))

        def forward(self, x):
            return aten.addmm.default(self.b, x, self.w)

    assert _count(Large(), Pattern()) == (1, 1)


def test_matcher_lists_with_nodes():
    def original(x, y):
        return aten.view(x, [5, y.shape[0]])

    def pattern(x, y, z):
        return aten.view(x, [z, y.shape[0]])

    def bad_pattern(x, y, b):
        return aten.view(x, [b, y.shape[0], y.shape[1]])

    assert _count(original, pattern) == (1, 1)
    assert _count(original, bad_pattern) == (0, 0)


def test_matcher_literals_and_free_literals():
    def original(x):
        return x + 1

    assert _count(original, lambda x: x + 2) == (0, 0)
    # SubgraphMatcher's ignore_literals=True: in torchgraft the literal becomes a parameter.
    gm = fx.symbolic_trace(original)
    assert len(tg.find_matches(gm.graph, tg.rule(lambda x, c: x + c, name="free"))) == 1


def test_no_match_and_explain_find_module_call_candidates():
    """A call_module pattern's candidates are the calls of a module of its class (not a
    target name): the no_match problem and tg.explain look at them."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x + 1)

    class Pattern(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x)

    rule = tg.rule(Pattern(), name="relu_module", where=lambda m: False)
    rule.replacement(lambda x: torch.tanh(x))
    handler = type("ModuleRule", (tg.Handler,), {"relu_module": rule})
    (problem,) = tg.PassManager([handler]).check(traced(M(), *X))
    assert problem.kind == "no_match" and problem.node == "act"
    assert "1 " in problem.message and "none matches" in problem.message
