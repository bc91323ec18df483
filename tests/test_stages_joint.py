"""The ``joint`` stage: rules over the joint forward + backward graph of the training step,
partitioned and trained; ``selective_recompute`` saves fewer activations."""

from __future__ import annotations

import pytest
import stage_handlers  # noqa: F401  (registers t_joint_gelu_backward: SiLU models never match it)
import torch

import torchgraft as tg
from torchgraft.ir.provenance import module_fqn
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.passes.joint import JointModule
from torchgraft.passes.report import Report
from torchgraft.train import TrainConfig, train

aten = torch.ops.aten


class SiluBackwardByFormula(tg.Handler):
    """``silu_backward(g, x)`` → ``g · σ(x) · (1 + x · (1 − σ(x)))``: the same derivative."""

    stage = "joint"

    @tg.rule
    def silu_backward(grad, x):
        return aten.silu_backward.default(grad, x)

    @silu_backward.replacement
    def _(grad, x):
        s = aten.sigmoid.default(x)
        slope = aten.add.Tensor(aten.mul.Tensor(x, aten.rsub.Scalar(s, 1)), 1)
        return aten.mul.Tensor(grad, aten.mul.Tensor(s, slope))


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 256, (2, 32), generator=generator) for _ in range(2))


def captured(seed: int = 0):
    model = build_llama("tiny", with_loss=True, seed=seed)
    return model, tg.capture(model, inputs())


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_backward_only_rule_rewrites_the_joint_graph_and_trains_the_same():
    config = TrainConfig(steps=5, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, progress=False)
    plain_model, plain_gm = captured()
    plain = train(plain_gm, config)
    model, gm = captured()
    pm = tg.PassManager([SiluBackwardByFormula])
    report = pm.run(gm)
    step = pm.joint_module(gm, report)
    assert isinstance(step, JointModule) and report.matches == {"SiluBackwardByFormula": 0}
    assert dict(step.named_parameters()) == dict(gm.named_parameters())  # the model's own
    converted = train(step, config)
    assert report.matches == {"SiluBackwardByFormula": 2}  # counted when traced
    assert report.stage_matches() == {"joint": {"SiluBackwardByFormula": 2}}
    assert converted.losses == pytest.approx(plain.losses, rel=1e-5, abs=0)
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert sqnr(p.detach(), q.detach()) > 90.0, name
    joint = step.joint_graph.graph
    assert not joint.find_nodes(op="call_function", target=aten.silu_backward.default)
    made = [n for n in joint.nodes if n.meta.get("torchgraft", {}).get("rule") == "silu_backward"]
    assert {module_fqn(n) for n in made} == {f"model.layers.{i}.feed_forward" for i in (0, 1)}
    # the backward GEMMs are there, with the forward module they belong to
    backward_mm = {
        module_fqn(n)
        for n in joint.find_nodes(op="call_function", target=aten.mm.default)
        if "fwd_nn_module_stack" in n.meta
    }
    assert "model.layers.1.feed_forward.w2" in backward_mm and "model.output" in backward_mm


def test_joint_gradients_match_the_eager_step_and_shapes_are_fixed():
    model, gm = captured()
    tokens, labels = inputs(1)
    gm(tokens, labels).backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    step = tg.PassManager([SiluBackwardByFormula]).joint_module(gm)
    step(tokens, labels).backward()
    assert all(sqnr(p.grad, eager[n]) > 100.0 for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="traced for inputs"):
        step(tokens[:1], labels[:1])


def test_a_joint_rule_that_matches_nothing_is_reported():
    _, gm = captured()
    report = Report(order=["t_joint_gelu_backward"])
    step = tg.PassManager(["t_joint_gelu_backward"]).joint_module(gm, report)
    step(*inputs()).backward()
    assert [p.kind for p in report.problems] == ["no_match"]
    assert "aten.gelu_backward.default" in report.problems[0].message


def saved_bytes(step: JointModule) -> int:
    """Bytes of the activations (not parameters) the forward graph hands to the backward."""
    forward, _ = step.partitioned
    (outputs,) = forward.graph.output_node().args
    values = [
        o.meta["val"] for o in outputs[1:] if isinstance(o, torch.fx.Node) and o.op != "placeholder"
    ]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def eager_saved_bytes(gm, model, args) -> int:
    """Bytes of the activations autograd saves in the eager step (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(*args).backward()
    return sum(storages.values())


def test_selective_recompute_saves_less_and_keeps_the_gradients():
    model, gm = captured()
    args = inputs(2)
    eager = eager_saved_bytes(gm, model, args)
    reference = grads(model)
    model.zero_grad(set_to_none=True)
    report = Report(order=["selective_recompute"])
    step = tg.PassManager(["selective_recompute"]).joint_module(gm, report)
    step(*args).backward()
    assert report.rule_matches["selective_recompute"]["activation_policy"] > 50
    assert all(sqnr(p.grad, reference[n]) > 100.0 for n, p in model.named_parameters())
    assert saved_bytes(step) < 0.7 * eager  # measured: 0.54x on this model
    everything = tg.PassManager([{"selective_recompute": {"save": []}}]).joint_module(gm)
    everything(*args).backward()
    assert saved_bytes(everything) < saved_bytes(step)


class SiluBackwardWrong(tg.Handler):
    """Drops the derivative: ``silu_backward(g, x)`` → ``g``."""

    stage = "joint"

    @tg.rule
    def silu_backward(grad, x):
        return aten.silu_backward.default(grad, x)

    @silu_backward.replacement
    def _(grad, x):
        return aten.mul.Tensor(grad, 1.0)


def test_joint_numerics_are_verified():
    _, gm = captured()
    args = inputs(3)
    good = tg.PassManager([SiluBackwardByFormula], verify=True, inputs=args).joint_module(gm)
    assert isinstance(good, JointModule) and good.joint_graph is not None  # traced to verify
    with pytest.raises(tg.CheckError, match=r"\[numerics\] SiluBackwardWrong") as error:
        tg.PassManager([SiluBackwardWrong], verify=True, inputs=args).joint_module(gm)
    assert "gradient of model.layers" in str(error.value)


class SigmoidByExp(tg.Handler):
    """``sigmoid(x)`` → ``1 / (1 + exp(-x))``: rewrites what ``SiluBackwardByFormula`` made."""

    stage = "joint"

    @tg.rule
    def sigmoid(x):
        return aten.sigmoid.default(x)

    @sigmoid.replacement
    def _(x):
        return aten.reciprocal.default(aten.add.Tensor(aten.exp.default(aten.neg.default(x)), 1))


def test_clobber_is_checked_within_the_joint_stage():
    _, gm = captured()
    report = Report(order=[])
    tg.PassManager([SiluBackwardByFormula, SigmoidByExp]).joint_module(gm, report)(*inputs())
    assert [p.kind for p in report.problems] == ["clobber"]
    assert report.problems[0].handlers == ("SiluBackwardByFormula", "SigmoidByExp")
    declared = type("SigmoidAfter", (SigmoidByExp,), {"after": ("SiluBackwardByFormula",)})
    report = Report(order=[])
    tg.PassManager([SiluBackwardByFormula, declared]).joint_module(gm, report)(*inputs())
    assert report.problems == [] and report.matches == {}
    assert report.rule_matches["SigmoidAfter"] == {"sigmoid": 2}


def test_joint_step_checkpoints_and_resumes_exactly(tmp_path):
    def fresh(seed: int = 0) -> JointModule:
        _, gm = captured(seed)
        return tg.PassManager([SiluBackwardByFormula]).joint_module(gm)

    settings = dict(steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, progress=False)
    full = train(fresh(), TrainConfig(**settings))
    config = TrainConfig(**settings, checkpoint_every=2, checkpoint_dir=tmp_path)

    class CrashAfter:
        left = 3

        def post_optimizer_hook(self, model_parts) -> None:
            CrashAfter.left -= 1
            if CrashAfter.left == 0:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(fresh(), config, [CrashAfter()])
    step = fresh(seed=5)
    assert set(step.state_dict()) == {n for n, _ in captured()[1].state_dict().items()}
    resumed = train(step, TrainConfig(**{**vars(config), "resume": True}))
    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]
