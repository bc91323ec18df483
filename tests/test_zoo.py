"""The zoo: models no one here wrote, captured directly from their ``transformers`` classes
(tiny configs, random weights, CPU) and converted by every linear handler, flex_attention
and chunked cross-entropy; a vision and an encoder model through ``check`` and ``viz``.

Each model is built and captured once per module (:class:`Zoo`); every test rewrites a copy
of its graph that shares the parameters (:func:`~torchgraft.ir.graph_copy.copy_graph_module`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import fx, nn

import torchgraft as tg
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ops.numerics import sqnr

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

ops = torch.ops.torchgraft
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
}
"""Each causal LM with dropout off (verify compares two runs of the graph)."""

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

    def llm(self, arch: str, with_loss: bool = False) -> Captured:
        key = (arch, "loss" if with_loss else "logits")
        if key not in self._cache:
            torch.manual_seed(0)
            model = LLMS[arch]()
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            inputs: tuple[torch.Tensor, ...] = (ids,)
            if with_loss:
                from torchgraft.models.hf import CausalLMWithLoss

                model = CausalLMWithLoss(model)
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


def _linear_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())


@pytest.mark.parametrize("handler", LINEAR_HANDLERS)
@pytest.mark.parametrize("arch", list(LLMS))
def test_linear_handlers_convert_every_linear_but_the_head(zoo, arch, handler):
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
