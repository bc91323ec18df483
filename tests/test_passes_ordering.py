"""Plans and their order: specs built or reported, declarations sorted stably, cycles named."""

from __future__ import annotations

import itertools
import random

import networkx as nx
import passes_handlers  # noqa: F401  (registers the t_* handlers)
import pytest

import torchgraft as tg
from torchgraft.handlers.base import HandlerDefinitionError
from torchgraft.passes.ordering import order_plan
from torchgraft.passes.plan import HandlerEntry, build_plan


def handler(name: str, **declarations: tuple[str, ...]) -> type[tg.Handler]:
    """An unregistered, rule-less handler class whose display name is ``name``."""
    return type(name, (tg.Handler,), dict(declarations))


def order_of(*classes: type[tg.Handler]) -> list[str]:
    pm = tg.PassManager(list(classes))
    assert pm.problems == []
    return pm.order


def kinds(problems) -> list[str]:
    return [p.kind for p in problems]


def test_without_declarations_the_plan_order_is_kept():
    names = ["a", "b", "c", "d", "e"]
    for perm in itertools.permutations(names):
        assert order_of(*(handler(n) for n in perm)) == list(perm)


def test_declarations_move_only_what_they_constrain():
    a, b, c = handler("a"), handler("b"), handler("c")
    assert order_of(handler("x", before=("a",)), a, b) == ["x", "a", "b"]
    assert order_of(a, b, handler("x", before=("b",)), c) == ["a", "x", "b", "c"]
    assert order_of(handler("x", after=("c",)), a, b, c) == ["a", "b", "c", "x"]
    assert order_of(b, handler("x", requires=("b",))) == ["b", "x"]
    assert order_of(handler("x", requires=("b",)), a, b) == ["a", "b", "x"]
    # after / before naming a handler absent from the plan constrain nothing
    assert order_of(handler("x", after=("zzz",), before=("yyy",)), a) == ["x", "a"]


def _lexicographic_best(graph: nx.DiGraph, names: list[str]) -> list[str]:
    valid = [
        list(p)
        for p in itertools.permutations(names)
        if all(p.index(u) < p.index(v) for u, v in graph.edges)
    ]
    return min(valid, key=lambda p: [names.index(n) for n in p])


def test_order_is_the_earliest_listed_ready_handler_each_time():
    """Property over random DAGs: the order satisfies every declaration and, among all
    orders that do, is the lexicographically smallest sequence of plan positions."""
    rng = random.Random(0)
    for trial in range(40):
        names = [f"h{trial}_{i}" for i in range(5)]
        rank = names[:]
        rng.shuffle(rank)  # a hidden valid order: edges only go forward in it
        edges = [(u, v) for u, v in itertools.combinations(rank, 2) if rng.random() < 0.3]
        attrs = {n: {"after": (), "before": ()} for n in names}
        for u, v in edges:
            if rng.random() < 0.5:
                attrs[v]["after"] += (u,)
            else:
                attrs[u]["before"] += (v,)
        classes = [handler(n, **attrs[n]) for n in names]
        graph = nx.DiGraph(edges)
        graph.add_nodes_from(names)
        assert order_of(*classes) == _lexicographic_best(graph, names)


def test_cycle_is_reported_with_its_members_and_reasons():
    a = handler("a", after=("c",))
    b = handler("b", after=("a",))
    c = handler("c", after=("b",))
    d = handler("d")
    pm = tg.PassManager([d, a, b, c])
    assert kinds(pm.problems) == ["cycle"]
    problem = pm.problems[0]
    assert set(problem.handlers) == {"a", "b", "c"}
    assert "a -> b -> c -> a" in problem.message
    assert "'a' declares after=('c',)" in problem.message
    with pytest.raises(tg.CheckError, match="cycle"):
        pm.run(None)  # refused before the graph is touched


def test_self_and_two_handler_cycles():
    assert kinds(tg.PassManager([handler("s", after=("s",))]).problems) == ["cycle"]
    x = handler("x", before=("y",))
    y = handler("y", before=("x",))
    problems = tg.PassManager([x, y]).problems
    assert kinds(problems) == ["cycle"] and problems[0].handlers == ("x", "y")


def test_missing_requirement():
    pm = tg.PassManager(["t_needs_rms"])
    assert kinds(pm.problems) == ["missing_requirement"]
    assert "requires 't_fuse_rms', which is not in the plan" in pm.problems[0].message
    assert tg.PassManager(["t_needs_rms", "t_fuse_rms"]).order == ["t_fuse_rms", "t_needs_rms"]


def test_unknown_handler_with_did_you_mean():
    (problem,) = tg.PassManager(["t_fuse_rmss"]).problems
    assert problem.kind == "unknown_handler" and problem.handlers == ("t_fuse_rmss",)
    assert "did you mean 't_fuse_rms'?" in problem.message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"dtyp": "float16"}, "has no option 'dtyp'; did you mean 'dtype'?"),
        ({"dtype": "int8"}, "option 'dtype' must be 'bfloat16' | 'float16', got 'int8'"),
        ({"skip_output": "yes"}, "option 'skip_output' must be bool"),
    ],
)
def test_bad_option_names_handler_and_option(options, expected):
    (problem,) = tg.PassManager([{"t_low_precision": options}]).problems
    assert problem.kind == "bad_option" and problem.handlers == ("t_low_precision",)
    assert expected in problem.message


def test_bad_option_quotes_the_config_location():
    entry = HandlerEntry(
        "t_low_precision",
        {"dtyp": "x"},
        source="run.yaml:4:5",
        option_sources={"dtyp": "run.yaml:4:23"},
    )
    (problem,) = tg.PassManager([entry]).problems
    assert problem.source == "run.yaml:4:23"


def test_duplicate():
    problems = tg.PassManager(["t_silu", "t_fuse_rms", "t_silu"]).problems
    assert kinds(problems) == ["duplicate"]
    assert "items 1 and 3" in problems[0].message


def test_specs_of_every_form_and_the_optional_key():
    steps, problems = build_plan(
        [
            "t_silu",
            {"t_fuse_rms": None},
            {"t_low_precision": {"optional": True, "dtype": "float16"}},
            passes_handlers.TRelu(),
            passes_handlers.TLinearMatmul,
        ]
    )
    assert problems == []
    assert [s.name for s in steps] == [
        "t_silu",
        "t_fuse_rms",
        "t_low_precision",
        "t_relu",
        "t_linear_matmul",
    ]
    assert [s.optional for s in steps] == [False, False, True, False, False]
    assert steps[2].handler.options.dtype == "float16"
    with pytest.raises(tg.TorchgraftError, match="'optional' must be true or false"):
        build_plan([{"t_silu": {"optional": "no"}}])
    with pytest.raises(tg.TorchgraftError, match="a plan item is"):
        build_plan([42])


def test_declaration_graph_and_queries():
    x = handler("x", before=("y",))
    y = handler("y")
    z = handler("z", after=("y",))
    steps, _ = build_plan([z, y, x])
    ordering = order_plan(steps)
    assert ordering.names == ["x", "y", "z"]
    assert ordering.declared("x", "y") and not ordering.declared("x", "z")
    assert ordering.constrained("z", "x")  # transitively
    assert ordering.graph.edges["x", "y"]["why"] == "'x' declares before=('y',)"


def test_handler_declarations_are_checked_when_the_class_is_defined():
    with pytest.raises(HandlerDefinitionError, match=r"after must be a tuple .*write \('a',\)"):
        handler("bad", after="a")
    with pytest.raises(HandlerDefinitionError, match="sqnr_tolerance"):
        handler("bad", sqnr_tolerance="high")
    with pytest.raises(HandlerDefinitionError, match="may not define \\['optional'\\]"):
        import dataclasses

        class Reserved(tg.Handler):
            @dataclasses.dataclass(kw_only=True)
            class Options:
                optional: bool = False
