"""Replacements that add parameters, buffers and constants to the graph module."""

from __future__ import annotations

import pytest
import torch
from engine_rules import LowRankAdapters as LoRA
from test_rollback_and_errors import RaisesInFakeOp
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import torchgraft as tg
from torchgraft.train.checkpoint import Checkpointer
from torchgraft.train.data import RandomWindows
from torchgraft.train.optim import build_param_groups

aten = torch.ops.aten
RANK = LoRA.rank


def _loss(gm, tokens):
    logits = gm(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())


def test_new_parameters_are_registered_saved_and_trained(llama_gm, tokens):
    ref = llama_gm(tokens)
    report = tg.PassManager([LoRA]).run(llama_gm)
    assert report.matches == {"LowRankAdapters": 4}  # tiny llama: 2 layers x (wq, w2)
    names = [fqn for r in report.records for fqn in r.attributes]
    assert names[:2] == ["layers.0.attention.wq.lora_a", "layers.0.attention.wq.lora_b"]
    state = llama_gm.state_dict()
    assert all(name in state for name in names) and len(set(names)) == 8
    params = dict(llama_gm.named_parameters())
    assert isinstance(params["layers.1.feed_forward.w2.lora_b"], nn.Parameter)
    a_node = next(n for n in llama_gm.graph.nodes if n.target == "layers.0.attention.wq.lora_a")
    assert a_node.meta["val"].shape == (RANK, 64) and a_node.meta["torchgraft"]["rule"] == "linear"
    torch.testing.assert_close(llama_gm(tokens), ref)  # B = 0: same function at first

    before = {n: params[n].detach().clone() for n in names}
    groups = build_param_groups(llama_gm, [], lr=1e-2, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(llama_gm, tokens).backward()
        optimizer.step()
    assert all(not torch.equal(params[n], before[n]) for n in names)


def test_new_parameters_survive_checkpoint_and_resume(llama, tokens, tmp_path):
    def build():
        gm = tg.capture(llama, (tokens,))
        tg.PassManager([LoRA]).run(gm)
        optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
        data = RandomWindows(torch.randint(0, 256, (512,)), batch_size=2, seq_len=16, seed=0)
        scheduler = LambdaLR(optimizer, lambda step: 1.0)
        return (
            gm,
            Checkpointer(tmp_path, model=gm, optimizer=optimizer, scheduler=scheduler, data=data),
            optimizer,
        )

    gm, checkpointer, optimizer = build()
    for _ in range(2):
        optimizer.zero_grad()
        _loss(gm, tokens).backward()
        optimizer.step()
    path = checkpointer.save({"step": 2})
    trained = gm.get_parameter("layers.0.attention.wq.lora_b").detach().clone()
    assert trained.abs().sum() > 0

    resumed, checkpointer, _ = build()  # fresh LoRA parameters (B = 0) ...
    assert resumed.get_parameter("layers.0.attention.wq.lora_b").abs().sum() == 0
    checkpointer.load(path, {"step": 0})  # ... replaced by the trained ones
    torch.testing.assert_close(resumed.get_parameter("layers.0.attention.wq.lora_b"), trained)
    torch.testing.assert_close(resumed(tokens), gm(tokens))


def test_rollback_removes_new_parameters(llama_gm):
    keys = set(llama_gm.state_dict())
    with pytest.raises(tg.RewriteError):
        tg.PassManager([LoRA, RaisesInFakeOp]).run(llama_gm)
    assert set(llama_gm.state_dict()) == keys
    assert not hasattr(llama_gm.get_submodule("layers.0.attention.wq"), "lora_a")


class FoldScale(tg.Handler):
    """``linear(x, w) * s`` → ``linear(x, w_scaled)`` with a folded buffer ``w * s``."""

    @tg.rule
    def scaled(x, w: nn.Parameter, s: float):
        return aten.mul.Tensor(aten.linear.default(x, w), s)

    @scaled.replacement
    def _(x, w, s):
        folded = tg.new_buffer("weight_scaled", tg.value_of(w).detach() * s, next_to=w)
        return aten.linear.default(x, folded)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4, bias=False)
        self.other = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.proj(x) * 0.5 + self.other(x) * 3.0


def test_replacement_folds_values_into_new_buffers():
    model, x = Scaled(), torch.randn(3, 8)
    gm = tg.capture(model, (x,))
    ref = model(x)
    report = tg.PassManager([FoldScale]).run(gm)
    assert report.matches == {"FoldScale": 2}
    state = gm.state_dict()
    torch.testing.assert_close(state["proj.weight_scaled"], model.proj.weight.detach() * 0.5)
    torch.testing.assert_close(state["other.weight_scaled"], model.other.weight.detach() * 3.0)
    torch.testing.assert_close(gm(x), ref)
    fresh = torch.randn(3, 8)
    torch.testing.assert_close(gm(fresh), model(fresh))


def test_parameter_annotation_binds_only_parameters():
    class ScaleByInput(nn.Module):
        def forward(self, x, w):
            return nn.functional.linear(x, w) * 0.5

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    gm = tg.capture(ScaleByInput(), (x, w))
    pm = tg.PassManager([FoldScale], allow=["no_match"])
    assert pm.run(gm).matches == {"FoldScale": 0}  # w is an input


def test_tensor_literal_in_replacement_becomes_a_constant():
    class ReluTimesTwo(tg.Handler):
        @tg.rule
        def relu(x):
            return aten.relu.default(x)

        @relu.replacement
        def _(x):
            return aten.mul.Tensor(aten.relu.default(x), torch.tensor(2.0))

    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)
    gm = tg.capture(model, (x,))
    report = tg.PassManager([ReluTimesTwo]).run(gm)
    (name,) = report.records[0].attributes
    assert name == "1._tensor_constant" and name not in gm.state_dict()
    torch.testing.assert_close(gm(x), model(x) * 2)


def test_module_replacement_shares_its_parameters_with_every_match():
    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return aten.relu.default(self.up(x))

    class ReluToAdapter(tg.Handler):
        relu = tg.rule(lambda x: aten.relu.default(x), name="relu")

    adapter = Adapter()
    ReluToAdapter.relu.replacement(adapter)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    gm = tg.capture(model, (x,))
    report = tg.PassManager([ReluToAdapter]).run(gm)
    assert [r.attributes for r in report.records] == [["1.up_weight"], ["3.up_weight"]]
    assert gm.get_parameter("1.up_weight") is adapter.up.weight  # shared, trained once
    assert len(list(gm.parameters())) == 5
    with torch.no_grad():
        expected = adapter(model[2](adapter(model[0](x))))
    torch.testing.assert_close(gm(x), expected)
