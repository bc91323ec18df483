"""Stages: ``Handler.stage`` checked at definition, the plan ordered and checked per stage,
the report listing stages, and the ``module`` stage (LoRA) before capture."""

from __future__ import annotations

import pytest
import torch
from engine_rules import SiluExpand
from torch import nn

import torchgraft as tg
from torchgraft.handlers.base import HandlerDefinitionError
from torchgraft.handlers.lora import LoRALinear
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr


def handler(name: str, stage: str = "graph", base: type = tg.Handler, **attrs) -> type:
    """An unregistered handler class named ``name`` at ``stage``."""
    return type(name, (base,), {"stage": stage, **attrs})


class Swap(tg.Handler):
    """Module stage: replaces every ReLU with a GELU (in place)."""

    stage = "module"

    def convert(self, model: nn.Module) -> nn.Module:
        for fqn, module in list(model.named_modules()):
            if isinstance(module, nn.ReLU):
                model.set_submodule(fqn, nn.GELU())
        return model


def test_stage_is_checked_when_the_class_is_defined():
    with pytest.raises(HandlerDefinitionError, match=r"stage must be one of 'module', 'graph'"):
        handler("bad", stage="backward")
    with pytest.raises(HandlerDefinitionError, match="stage 'module' but declares rules"):
        handler("ruled", stage="module", base=SiluExpand)
    with pytest.raises(HandlerDefinitionError, match="does not override convert"):
        handler("bare", stage="module")
    with pytest.raises(HandlerDefinitionError, match="only the 'joint' stage uses"):
        handler("policy", activation_policy=lambda self, node: "save")
    assert handler("joint_policy", "joint", activation_policy=lambda self, node: None)
    assert tg.Handler.stage == "graph" and handler("g").stage == "graph"


def test_order_is_stage_order_then_plan_order():
    j1, j2 = handler("j1", "joint"), handler("j2", "joint")
    g1, c1 = handler("g1"), handler("c1", "compile")
    m1 = handler("m1", "module", base=Swap)
    pm = tg.PassManager([c1, j1, g1, j2, m1])
    assert pm.problems == []
    assert pm.order == ["m1", "g1", "j1", "j2", "c1"]
    assert {s: [st.name for st in o.steps] for s, o in pm.stages.items()} == {
        "module": ["m1"],
        "graph": ["g1"],
        "joint": ["j1", "j2"],
        "compile": ["c1"],
    }
    # within a stage, declarations still reorder
    j3 = handler("j3", "joint", before=("j1",))
    assert tg.PassManager([j1, j3]).order == ["j3", "j1"]


def test_a_declaration_against_the_stage_order_is_an_order_problem():
    joint = handler("late", "joint")
    graph = handler("early", after=("late",))
    problems = tg.PassManager([joint, graph]).problems
    assert [p.kind for p in problems] == ["order"]
    assert problems[0].handlers == ("late", "early")
    assert "stage 'joint'" in problems[0].message and "module -> graph" in problems[0].message
    # declarations that agree with the stage order are fine
    assert tg.PassManager([handler("ok", "joint", after=("x",)), handler("x")]).problems == []
    # a requirement at a later stage cannot be met either
    needs = handler("needs", requires=("late",))
    assert [p.kind for p in tg.PassManager([needs, joint]).problems] == ["order"]
    # a cycle inside one stage is still a cycle
    a = handler("a", "joint", after=("b",))
    b = handler("b", "joint", after=("a",))
    assert [p.kind for p in tg.PassManager([a, b]).problems] == ["cycle"]
    with pytest.raises(tg.CheckError, match=r"\[order\]"):
        tg.PassManager([joint, graph]).run(torch.fx.symbolic_trace(nn.ReLU()))


def test_overlap_is_checked_within_a_stage(llama_gm):
    same_stage = tg.PassManager([handler("s1", base=SiluExpand), handler("s2", base=SiluExpand)])
    assert "overlap" in [p.kind for p in same_stage.check(llama_gm)]
    other_stage = tg.PassManager(
        [handler("s1", base=SiluExpand), handler("s2", "joint", base=SiluExpand)]
    )
    assert other_stage.check(llama_gm) == []
    report = other_stage.run(llama_gm)
    assert report.stages == {"graph": ["s1"], "joint": ["s2"]}
    assert report.stage_matches() == {"graph": {"s1": 2}, "joint": {"s2": 0}}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_module_stage_conversion_is_visible_in_the_captured_graph():
    model, x = MLP(), torch.randn(3, 8)
    pm = tg.PassManager([Swap])
    report = pm.convert_module(model)
    assert report.matches == {"Swap": 1} and isinstance(model.body[1], nn.GELU)
    gm = tg.capture(model, (x,))
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.gelu.default" in ops and "aten.relu.default" not in ops


def test_lora_adapters_are_in_the_graph_and_compute_the_update():
    model = build_llama("tiny", seed=0)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    before = model(tokens).detach()
    pm = tg.PassManager([{"lora": {"targets": ["layers.*.attention.w?"], "rank": 4}}])
    assert pm.convert_module(model).matches == {"lora": 8}  # 2 layers x wq wk wv wo
    gm = tg.capture(model, (tokens,))
    params = dict(gm.named_parameters())
    assert "layers.0.attention.wq.lora_a" in params and "layers.1.attention.wo.lora_b" in params
    assert params["layers.0.attention.wq.lora_a"] is model.layers[0].attention.wq.lora_a
    lora_linears = [
        n
        for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
        if "lora" in str(n.args[1].target)
    ]
    assert len(lora_linears) == 16
    assert torch.equal(gm(tokens), before)  # B starts at zero: the model is unchanged
    generator = torch.Generator().manual_seed(4)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_b.data.normal_(0, 0.05, generator=generator)
    reference = build_llama("tiny", seed=0).double()
    tg.PassManager([{"lora": {"targets": ["layers.*.attention.w?"], "rank": 4}}]).convert_module(
        reference
    )
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    out, ref = gm(tokens), reference(tokens)
    assert sqnr(out.double(), ref) > 100.0 and sqnr(before.double(), ref) < 40.0
    out.sum().backward()  # only the adapters train
    trainable = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert trainable and all(".lora_" in n or "attention.w" not in n for n in trainable)
    assert model.layers[0].attention.wq.base.weight.grad is None


def test_module_stage_rolls_back_and_reports_no_match():
    class Breaks(Swap):
        def convert(self, model):
            super().convert(model)
            model.head.weight.requires_grad_(False)
            raise RuntimeError("midway")

    model = MLP()
    relu, head_weight = model.body[1], model.head.weight
    with pytest.raises(RuntimeError, match="midway"):
        tg.PassManager([Breaks]).convert_module(model)
    assert model.body[1] is relu and model.head.weight is head_weight
    assert head_weight.requires_grad
    report = tg.PassManager([{"lora": {"targets": ["nothing.*"]}}]).convert_module(model)
    assert [p.kind for p in report.problems] == ["no_match"]
    assert "stage 'module'" in report.problems[0].message
    assert (
        tg.PassManager([{"lora": {"targets": ["nothing.*"], "optional": True}}])
        .convert_module(model)
        .problems
        == []
    )
