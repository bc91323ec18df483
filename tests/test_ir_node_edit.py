"""``ir/node_edit.py`` leaves a graph exactly as ``Graph.create_node`` / ``erase_node`` do."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from torchgraft.ir.node_edit import Inserter, erase_nodes


class Small(torch.nn.Module):
    def forward(self, x, y):
        a = torch.relu(x)
        b = torch.add(a, y, alpha=2)
        return torch.neg(b) + a


def _pair() -> tuple[fx.GraphModule, fx.GraphModule]:
    return fx.symbolic_trace(Small()), fx.symbolic_trace(Small())


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _state(gm: fx.GraphModule) -> tuple:
    """Everything the two ways must agree on: code, order, names, uses, find_nodes, count."""
    graph = gm.graph
    gm.recompile()
    nodes = list(graph.nodes)
    uses = [(n.name, sorted(u.name for u in n.users), type(n.kwargs).__name__) for n in nodes]
    found = [
        [n.name for n in graph.find_nodes(op=op, target=target)]
        for op, target in [
            ("call_function", torch.relu),
            ("call_function", torch.sigmoid),
            ("call_function", torch.add),
            ("placeholder", None),
        ]
    ]
    return gm.code, uses, found, len(graph.nodes), [n.meta.get("tag") for n in nodes]


def test_insert_matches_create_node():
    ours, theirs = _pair()
    x, add = _node(theirs, "x"), _node(theirs, "add")
    with theirs.graph.inserting_before(add):
        for _ in range(2):  # a taken name gets a suffix
            node = theirs.graph.create_node(
                "call_function", torch.sigmoid, (x,), {"out": None}, name="relu"
            )
            node.meta.update(tag="new")
    x, add = _node(ours, "x"), _node(ours, "add")
    for _ in range(2):
        Inserter(ours.graph).insert(
            add,
            "call_function",
            torch.sigmoid,
            (x,),
            {"out": None},
            "relu",
            {"tag": "new"},
        )
    assert _state(ours) == _state(theirs)
    assert [n.name for n in ours.graph.nodes][:5] == ["x", "y", "relu", "relu_1", "relu_2"]
    ours.graph.lint()


def test_one_inserter_for_many_nodes_matches_create_node():
    """An Inserter reuses the find_nodes table entry of a target between insertions."""
    ours, theirs = _pair()
    x, add = _node(theirs, "x"), _node(theirs, "add")
    with theirs.graph.inserting_before(add):
        for target in (torch.sigmoid, torch.relu, torch.sigmoid):
            theirs.graph.create_node("call_function", target, (x,), {}, name="s")
    x, add = _node(ours, "x"), _node(ours, "add")
    inserter = Inserter(ours.graph)
    for target in (torch.sigmoid, torch.relu, torch.sigmoid):
        inserter.insert(add, "call_function", target, (x,), {}, "s", {})
    assert _state(ours) == _state(theirs)
    ours.graph.lint()


def test_erase_matches_erase_node():
    ours, theirs = _pair()
    for gm in (ours, theirs):
        add = _node(gm, "add")
        add.replace_all_uses_with(_node(gm, "y"))
    theirs.graph.erase_node(_node(theirs, "add"))
    erase_nodes(ours.graph, [_node(ours, "add")])
    assert _state(ours) == _state(theirs)
    ours.graph.lint()


def test_hooks_are_called():
    gm = fx.symbolic_trace(Small())
    created, erased = [], []
    gm._register_create_node_hook(lambda n: created.append(n.name))
    gm._register_erase_node_hook(lambda n: erased.append(n.name))
    node = Inserter(gm.graph).insert(
        _node(gm, "add"), "call_function", torch.sigmoid, (), {}, "s", {}
    )
    erase_nodes(gm.graph, [node])
    assert created == erased == ["s"]


def test_erasing_a_used_node_is_refused():
    gm = fx.symbolic_trace(Small())
    with pytest.raises(RuntimeError, match="still has users"):
        erase_nodes(gm.graph, [_node(gm, "relu")])
    gm.graph.lint()
