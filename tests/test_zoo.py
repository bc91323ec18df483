"""The zoo: models no one here wrote, captured directly from their ``transformers`` classes
(tiny configs, random weights, CPU) and converted by every linear handler, flex_attention
and chunked cross-entropy; a vision and an encoder model through ``check`` and ``viz``.

Each model is built and captured once per module (:class:`Zoo`); every test rewrites a copy
of its graph that shares the parameters (:func:`~torchgraft.ir.graph_copy.copy_graph_module`).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import fx, nn

import torchgraft as tg
from torchgraft.handlers.bitnet import BitNet
from torchgraft.handlers.mx import MX
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ops.numerics import sqnr
from torchgraft.passes.verify import CALIBRATION_MARGIN_DB

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

ops = torch.ops.torchgraft
aten = torch.ops.aten
VOCAB, BATCH, SEQ = 128, 2, 16
SLIDING = 8
"""Sliding window of Mistral and Gemma2 here: shorter than SEQ, so it masks something."""

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLMS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_DECODER, sliding_window=SLIDING)
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**_DECODER, pad_token_id=0)
    ),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_DECODER, head_dim=16, sliding_window=SLIDING)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER)),
    "falcon": lambda: transformers.FalconForCausalLM(  # multi-query, parallel attn + MLP
        transformers.FalconConfig(
            **{k: _DECODER[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
            num_attention_heads=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    ),
}
"""Each causal LM with dropout off (verify compares two runs of the graph)."""

_ENCODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
ENCODERS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "bert": lambda: (
        transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, **_ENCODER)),
        (torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)),),
    ),
    "vit": lambda: (
        transformers.ViTForImageClassification(
            transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **_ENCODER)
        ),
        (torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1)),),
    ),
}
ENCODER_HEADS = {"bert": "cls.predictions.decoder", "vit": "classifier"}

LINEAR_HANDLERS = ("float8", "int8", "mx", "bitnet")
LINEAR_OPS = {
    "float8": ops.float8_linear.default,
    "int8": ops.int8_linear.default,
    "mx": ops.mx_linear.default,
    "bitnet": ops.bitnet_linear.default,
}


@dataclasses.dataclass
class Captured:
    model: nn.Module
    gm: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]

    def copy(self) -> fx.GraphModule:
        return copy_graph_module(self.gm)

    @functools.cached_property
    def reference(self) -> torch.Tensor:
        with torch.no_grad():
            return _logits(self.model(*self.inputs))


class Zoo:
    """Builds and captures each model on first use."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Captured] = {}

    def encoder(self, arch: str) -> Captured:
        """``bert`` (masked LM) or ``vit`` (image classifier)."""
        if (arch, "") not in self._cache:
            torch.manual_seed(0)
            model, inputs = ENCODERS[arch]()
            self._cache[arch, ""] = Captured(model, tg.capture(model, inputs), inputs)
        return self._cache[arch, ""]

    def llm(self, arch: str, with_loss: bool = False) -> Captured:
        key = (arch, "loss" if with_loss else "logits")
        if key not in self._cache:
            torch.manual_seed(0)
            model = LLMS[arch]()
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            inputs: tuple[torch.Tensor, ...] = (ids,)
            if with_loss:
                from torchgraft.train.lm import NextTokenLoss

                model = NextTokenLoss(model)
                inputs = (ids, torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen))
            self._cache[key] = Captured(model, tg.capture(model, inputs), inputs)
        return self._cache[key]


@pytest.fixture(scope="module")
def zoo() -> Iterator[Zoo]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared CPU
    yield Zoo()
    torch.set_num_threads(threads)


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"]


def _dead(gm: fx.GraphModule) -> set[str]:
    return {
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function" and not n.users and not n.is_impure()
    }


def _linear_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())


@pytest.mark.parametrize("handler", LINEAR_HANDLERS)
@pytest.mark.parametrize("arch", list(LLMS))
def test_linear_handlers_convert_every_linear_but_the_head(zoo, arch, handler):
    """Regression (issue 11): float8 / int8 converted 1 of GPT-2's 9 GEMMs (``Conv1D`` is
    ``addmm``), and the default ``skip_fqns: [output]`` converted every ``lm_head``."""
    captured = zoo.llm(arch)
    gm = captured.copy()
    report = tg.PassManager([handler]).run(gm)
    expected = _linear_layers(captured.model) - 1  # every linear-like layer but lm_head
    assert report.matches == {handler: expected}
    (head,) = report.skipped[handler]
    assert head.module_fqn == "lm_head" and "produces the logits" in head.reason
    assert len(gm.graph.find_nodes(op="call_function", target=LINEAR_OPS[handler])) == expected
    out = _logits(gm(*captured.inputs))
    tolerance = tg.get_handler(handler)().sqnr_tolerance
    assert sqnr(out, captured.reference) > tolerance


@pytest.mark.parametrize("handler", LINEAR_HANDLERS)
@pytest.mark.parametrize("arch", list(LLMS))
def test_check_is_clean(zoo, arch, handler):
    """Regression (issue 11): Gemma2 failed ``check`` with mx (11.8 dB < 14) and bitnet
    (-5.0 dB < -3), tolerances measured on Llama; its calibrated tolerance admits them."""
    result = tg.PassManager([handler]).dry_run(zoo.llm(arch).gm)
    assert result.problems == []
    s = result.report.sqnr[handler]
    assert s.calibrated_db is not None and s.op_db >= s.op_tolerance_db  # calibrated, per op


MOE = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **_DECODER,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
    "phimoe": lambda: transformers.PhimoeForCausalLM(
        transformers.PhimoeConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
    ),
    "jetmoe": lambda: transformers.JetMoeForCausalLM(  # mixture of attention heads, too
        transformers.JetMoeConfig(
            **_DECODER, num_local_experts=4, num_experts_per_tok=2, kv_channels=16
        )
    ),
}
"""Mixture-of-experts LMs (2 layers, 4 experts, top-2), as transformers ships them: Mixtral
and Qwen2-MoE choose experts with ``topk``, PhiMoE's sparse mixer with ``max`` along a dim
inside a ``torch.no_grad()`` region (exported as a higher-order op)."""


@pytest.fixture(scope="module")
def moe() -> Callable[[str], Captured]:
    """``moe(arch)``: the :data:`MOE` model ``arch``, built and captured on first use."""

    @functools.cache
    def captured(arch: str) -> Captured:
        torch.manual_seed(0)
        model = MOE[arch]()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        return Captured(model, tg.capture(model, (ids,)), (ids,))

    return captured


@pytest.mark.parametrize("handler", ["float8", "mx"])
def test_expert_choices_are_held_while_numerics_are_judged(moe, handler):
    """Regression: float8 / mx on Qwen2-MoE failed check on the experts' weight gradient
    (9.2 / 10.0 dB), which no handler touches: rounding upstream moved 4-5 of the 32 tokens
    to other experts. The judge now holds each topk to the original's choice, and reports
    how many rows would have chosen otherwise."""
    result = tg.PassManager([handler]).dry_run(moe("qwen2_moe").gm)
    assert result.problems == []
    s = result.report.sqnr[handler]
    assert s.choices_changed > 0 and s.step_db > 15


class ContraryRouter(tg.Handler):
    """A broken rewrite of the experts' choice: the lowest-scoring experts instead of the
    highest, from the same scores."""

    sqnr_tolerance = 12.0

    @tg.rule
    def topk(x, k):
        values, index = aten.topk.default(x, k, -1)
        return values, index

    @topk.replacement
    def _(self, x, k):
        values, index = aten.topk.default(x, k, -1, False)
        return values, index


def test_held_choices_do_not_hide_a_wrong_router(moe):
    """Held to the original's choice, the contrary router's outputs equal the original's;
    but every row chose otherwise from unchanged scores, which no rounding explains."""
    result = tg.PassManager([ContraryRouter]).dry_run(moe("qwen2_moe").gm)
    assert [p.kind for p in result.problems] == ["numerics"]
    assert "scores moved too little to explain it" in result.problems[0].message
    assert result.report.sqnr["ContraryRouter"].choices_changed == 2 * BATCH * SEQ  # 2 layers


ROUTERS = {"mixtral": "gate", "phimoe": "router"}
"""The router's name in each MoE's ``mlp`` (the handlers find it by structure, not name)."""


@pytest.mark.parametrize("arch", sorted(ROUTERS))
@pytest.mark.parametrize("handler", LINEAR_HANDLERS)
def test_the_expert_router_stays_in_high_precision_by_structure(moe, arch, handler):
    """A router's logits pick each token's experts (``topk``; ``max`` inside a no-grad
    region for PhiMoE): rounding them moves tokens to other experts, so the handlers leave
    it alone, found by structure like the head (``skip_router``). Measured before: int8
    converted both of Mixtral's routers and failed check (router gradient 12.0 dB < 26), mx
    too (7.4 dB); mx and bitnet converted PhiMoE's (router gradient -63 / -40 dB)."""
    captured = moe(arch)
    report = tg.PassManager([handler]).run(captured.copy())
    skipped = {s.module_fqn: s.reason for s in report.skipped[handler]}
    routers = {f"model.layers.{i}.mlp.{ROUTERS[arch]}" for i in range(2)}
    assert routers <= set(skipped)
    assert all("routes tokens to experts" in skipped[fqn] for fqn in routers)
    assert tg.PassManager([handler]).check(captured.gm) == []
    unskipped = tg.PassManager([{handler: {"skip_router": False}}]).run(captured.copy())
    still = {s.module_fqn: s.reason for s in unskipped.skipped[handler]}
    assert not any("routes tokens" in reason for reason in still.values())
    # converted, unless the format refuses the shape (float8: N=4 experts is not a multiple of 16)
    assert unskipped.matches[handler] == report.matches[handler] + len(routers - set(still))


@pytest.mark.parametrize("handler", ["mx", "bitnet"])
def test_gemma2_is_judged_by_what_its_architecture_makes_of_the_format(zoo, handler):
    """Why Gemma2 passes with mx / bitnet, below the tolerances declared from Llama. Not a
    lenient judge of the rewrite: the rewritten graph equals, bit for bit, the eager model
    with the same op swapped into every linear but the head, and each op reaches its
    ``op_sqnr_tolerance``. The architecture: Gemma2's post-attention / post-feedforward
    norms rescale each quantized branch to unit RMS before the residual add, so noise of the
    ops' own size costs Gemma2 more than Llama (calibrated, measured: mx 13.7 dB, 20.6 with
    those norms made identity; bitnet -6.8 and -1.0 dB); the handler is held to that, less
    the margin."""
    torch.manual_seed(0)
    model = LLMS["gemma2"]()
    ids = zoo.llm("gemma2").inputs[0]
    gm = tg.capture(model, (ids,))
    s = tg.PassManager([handler], verify=True).run(gm).sqnr[handler]
    assert s.op_db >= s.op_tolerance_db  # each op is as good as the format
    assert s.step_db < s.declared_db  # below what Llama gets ...
    assert s.tolerance_db == s.calibrated_db - CALIBRATION_MARGIN_DB <= s.step_db  # ... as noise
    (config,) = {
        n.args[3:] for n in gm.graph.find_nodes(op="call_function", target=LINEAR_OPS[handler])
    }
    params = [p for _, p in model.named_parameters()]
    r = torch.randn(BATCH, SEQ, VOCAB, generator=torch.Generator().manual_seed(2))

    def outputs_and_grads(module: nn.Module) -> list[torch.Tensor]:
        out = _logits(module(ids))
        return [out.detach(), *torch.autograd.grad((out * r).sum(), params, allow_unused=True)]

    rewritten = outputs_and_grads(gm)
    for name, linear in model.named_modules():
        if isinstance(linear, nn.Linear) and name != "lm_head":
            linear.forward = functools.partial(_swapped, LINEAR_OPS[handler], linear, config)
    swapped = outputs_and_grads(model)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(rewritten, swapped))
    torch.manual_seed(0)
    without_post_norms = LLMS["gemma2"]()
    for layer in without_post_norms.model.layers:
        layer.post_attention_layernorm.forward = _identity
        layer.post_feedforward_layernorm.forward = _identity
    result = tg.PassManager([handler]).dry_run(tg.capture(without_post_norms, (ids,)))
    assert result.problems == []
    assert result.report.sqnr[handler].calibrated_db > s.calibrated_db + 3


class WrongScale(MX):
    """mxfp8 with a weight scale 25% off: each op reads 12 dB (its format gives 24-27)."""

    def quantized_linear(self, x, w, b):
        return ops.mx_linear.default(x, aten.mul.Tensor(w, 1.25), b, self.options.format)


class DropsTerm(MX):
    """mxfp8 that drops the contraction's first block of 32 input features."""

    def quantized_linear(self, x, w, b):
        x, w = aten.slice.Tensor(x, -1, 32), aten.slice.Tensor(w, 1, 32)
        return ops.mx_linear.default(x, w, b, self.options.format)


class SystematicOffset(MX):
    """mxfp8 plus a constant of 10% of the output's RMS: a biased error of per-op SQNR 19 dB,
    above the per-op tolerance, that adds up across layers as random noise does not."""

    def quantized_linear(self, x, w, b):
        y = ops.mx_linear.default(x, w, b, self.options.format)
        rms = aten.sqrt.default(aten.mean.default(aten.mul.Tensor(y, y)))
        return aten.add.Tensor(y, aten.mul.Tensor(aten.detach.default(rms), 0.1))


class BitNetWrongScale(BitNet):
    """BitNet with the ternary weights' scale doubled (per-op SQNR 0 dB; its format gives 5)."""

    def quantized_linear(self, x, w, b):
        return ops.bitnet_linear.default(x, aten.mul.Tensor(w, 2.0), b, self.options.kernel)


BROKEN = {
    WrongScale: "per-op SQNR",
    DropsTerm: "per-op SQNR",
    SystematicOffset: "calibrated tolerance",
    BitNetWrongScale: "per-op SQNR",
}
"""Each broken quantizer, and what catches it: the per-op tolerance, or the model-level
tolerance calibrated with noise of the per-op error's size (which a biased error fails)."""


@pytest.mark.parametrize("broken", list(BROKEN), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_broken_quantizer_is_still_a_numerics_problem(zoo, arch, broken):
    """Calibration lowers the bar on Gemma2 to what its architecture makes of the format's
    per-op error, but not for a quantizer that is wrong: as measured (seed 0), a wrong scale
    reads 12 dB per op (mxfp8 tolerance 15), a dropped term 2-3 dB, a wrong BitNet scale
    0 dB (tolerance 2), and the biased offset 9.0 dB on Llama (calibrated 12.7 - 3) and 0.5
    dB on Gemma2 (5.1 - 3), at a per-op 19 dB that passes."""
    problems = tg.PassManager([broken]).check(zoo.llm(arch).gm)
    assert problems and all(p.kind == "numerics" for p in problems)
    assert all(p.handlers == (broken().display_name,) for p in problems)
    assert any(BROKEN[broken] in p.message for p in problems), problems


def _heads(node: fx.Node) -> int:
    return node.meta["val"].shape[1]


def _swapped(op, linear: nn.Linear, config: tuple, x: torch.Tensor) -> torch.Tensor:
    return op(x, linear.weight, linear.bias, *config)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


FLEX_EXPECTED = {
    "gpt2": ("masked_sdpa", [None, None], None),
    "qwen2": ("masked_sdpa_gqa", [None, None], None),
    "mistral": ("masked_sdpa_gqa", [SLIDING, SLIDING], None),
    "phi3": ("masked_sdpa_gqa", [None, None], None),
    "gemma2": ("softcapped_attention_gqa", [SLIDING, None], 50.0),
    "llama": ("masked_sdpa_gqa", [None, None], None),
    "falcon": ("masked_sdpa", [None, None], None),
}
"""Rule, sliding window per layer and soft-cap of each model's attention. Gemma2 has only
eager attention (no SDPA), soft-capped, with sliding and global layers alternating."""


@pytest.mark.parametrize("arch", list(FLEX_EXPECTED))
def test_flex_attention_converts_the_attention(zoo, arch):
    """Regression (issue 11): 0 matches on every HF model (an explicit mask tensor, not
    ``is_causal=True``; Gemma2's eager, soft-capped attention)."""
    gm = zoo.llm(arch).copy()
    report = tg.PassManager(["flex_attention"]).run(gm)
    rule, windows, softcap = FLEX_EXPECTED[arch]
    assert report.matches == {"flex_attention": 2}  # one per layer
    assert report.rule_matches["flex_attention"][rule] == 2
    flex = gm.graph.find_nodes(op="call_function", target=ops.flex_attention.default)
    assert [n.args[6] for n in flex] == windows
    assert [n.args[7] for n in flex] == [softcap, softcap]
    # grouped-query exactly where k has fewer heads than q: kv heads not copied (HF's
    # repeat_kv undone) or broadcast (Falcon's one k, v head)
    assert all(n.args[5] == (_heads(n.args[1]) < _heads(n.args[0])) for n in flex)
    assert not report.skipped["flex_attention"]
    # the mask subgraph went with the attention (eager mode would compute it per forward:
    # measured 37 -> 28 ms, median of 7 forwards of a 2-layer Mistral at 2 x 1024 tokens)
    assert _dead(gm) <= _dead(zoo.llm(arch).gm)  # (HF graphs have a few dead ops of their own)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])  # causal, sliding, soft-capped
def test_flex_attention_numerics(zoo, arch):
    """Outputs and gradients of the converted graph against SDPA (one flex compile each)."""
    assert tg.PassManager(["flex_attention"]).check(zoo.llm(arch).gm) == []


def test_flex_attention_lays_its_output_out_as_sdpa_did(moe):
    """Regression: SDPA returns the query's memory layout (``[B, S, H, D]`` here) and JetMoE
    ``view``s the transposed output, which only that layout allows; flex's contiguous
    ``[B, H, S, D]`` output made the rewritten graph fail ("view size is not compatible
    with input tensor's size and stride"). The op's output now takes the matched one's."""
    jetmoe = moe("jetmoe")
    sdpa = jetmoe.gm.graph.find_nodes(
        op="call_function", target=aten.scaled_dot_product_attention.default
    )
    assert not sdpa[0].meta["val"].is_contiguous()  # the layout this is about
    gm = jetmoe.copy()
    report = tg.PassManager(["flex_attention"]).run(gm)
    assert report.matches == {"flex_attention": 2}
    out = _logits(gm(*jetmoe.inputs))
    assert sqnr(out, jetmoe.reference) > 40
    assert tg.PassManager(["flex_attention"]).check(jetmoe.gm) == []


@pytest.mark.parametrize("arch", list(LLMS))
def test_chunked_cross_entropy_matches_with_the_linear_handlers(zoo, arch):
    """Regression (issue 11): Gemma2's final logit soft-capping, between the head and the
    loss, kept the chunked loss from matching; the op now soft-caps each chunk."""
    captured = zoo.llm(arch, with_loss=True)
    gm = captured.copy()
    report = tg.PassManager([{"chunked_cross_entropy": {"chunk_size": 8}}, "float8"]).run(gm)
    assert report.matches == {
        "chunked_cross_entropy": 1,
        "float8": _linear_layers(captured.model) - 1,
    }
    assert report.skipped["float8"] == []  # the head is inside the chunked loss now
    loss, ref = gm(*captured.inputs), captured.model(*captured.inputs)
    assert sqnr(loss, ref) > 20


def test_soft_capped_loss_is_chunked_with_the_unchunked_loss_and_gradients(zoo):
    """Gemma2's ``tanh(logits / 30) * 30`` before the loss: the chunked graph (4 chunks)
    against the unchunked one on fresh tokens, loss and every parameter's gradient."""
    captured = zoo.llm("gemma2", with_loss=True)
    gm = captured.copy()
    report = tg.PassManager([{"chunked_cross_entropy": {"chunk_size": 8}}]).run(gm)
    assert report.rule_matches["chunked_cross_entropy"]["softcap_flatten_ce"] == 1
    (op,) = gm.graph.find_nodes(op="call_function", target=ops.chunked_linear_cross_entropy.default)
    assert op.args[7] == 30.0  # Gemma2Config's final_logit_softcapping
    gen = torch.Generator().manual_seed(11)
    inputs = tuple(torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(2))
    params = [p for _, p in captured.gm.named_parameters()]
    results = []
    for graph in (gm, captured.gm):
        loss = graph(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss, grads), (ref_loss, ref_grads) = results
    assert sqnr(loss, ref_loss) > 100
    assert min(sqnr(g, r) for g, r in zip(grads, ref_grads)) > 80


@pytest.mark.parametrize("handler", LINEAR_HANDLERS)
@pytest.mark.parametrize("arch", list(ENCODERS))
def test_encoder_and_vision_models_convert_every_linear_but_the_head(zoo, arch, handler):
    """BERT's ``attention.output.dense`` and ``output.dense`` are converted (no name-based
    skip); the head, found by structure, is not."""
    captured = zoo.encoder(arch)
    gm = captured.copy()
    report = tg.PassManager([handler]).run(gm)
    assert report.matches == {handler: _linear_layers(captured.model) - 1}
    (head,) = report.skipped[handler]
    assert head.module_fqn.endswith(ENCODER_HEADS[arch])
    tolerance = tg.get_handler(handler)().sqnr_tolerance
    assert sqnr(_logits(gm(*captured.inputs)), captured.reference) > tolerance


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_encoder_and_vision_models_check_clean(zoo, arch):
    """The key-projection bias gradient is zero in exact arithmetic; verify judges it against
    the gradients' scale, so it raises no alarm (it used to: -2.6 to -9.8 dB)."""
    assert tg.PassManager(["int8"]).check(zoo.encoder(arch).gm) == []


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_encoder_and_vision_models_viz(zoo, arch, tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz dot is not installed")
    from torchgraft.tools.visualize import visualize_plan

    rendering = visualize_plan(zoo.encoder(arch).gm, ["float8"], tmp_path)
    page = rendering.html.read_text(encoding="utf-8")
    assert "float8" in page and "float8_linear" in rendering.after_svg.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("arch", "plan"), [("mistral", ["flex_attention", "int8"]), ("gpt2", ["int8"])]
)
def test_symbolic_batch_and_sequence_are_matched_and_rewritten(zoo, arch, plan):
    """``dynamic_shapes`` reaches torch.export; every rule matches the symbolic graph (GPT-2:
    ``addmm`` on ``[batch * seq, K]``), the sliding-window mask is classified at two sizes,
    and the rewritten graph runs other shapes than the example's."""
    from torch.export import Dim

    model = zoo.llm(arch).model
    ids = zoo.llm(arch).inputs[0]
    dims = {"input_ids": {0: Dim("batch", max=8), 1: Dim("seq", min=2, max=32)}}
    gm = tg.capture(model, (ids,), dynamic_shapes=dims)
    assert not isinstance(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0], int)
    report = tg.PassManager(plan).run(gm)
    assert report.matches["int8"] == _linear_layers(model) - 1
    if "flex_attention" in plan:
        assert report.matches["flex_attention"] == 2
        flex = gm.graph.find_nodes(op="call_function", target=ops.flex_attention.default)
        assert [n.args[6] for n in flex] == [SLIDING, SLIDING]
    other = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert sqnr(_logits(gm(other)), _logits(model(other))) > 26
