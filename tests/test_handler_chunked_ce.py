"""``chunked_cross_entropy``: the op against ``F.cross_entropy(F.linear(...))``, its memory,
and the handler on the tiny Llama, on hand-written loss chains and on ``transformers``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgraft as tg
from torchgraft.handlers.chunked_loss import ChunkedCrossEntropy
from torchgraft.handlers.options import OptionError
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.tools.memory import measure

aten = torch.ops.aten
ops = torch.ops.torchgraft


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _labels(shape, vocab: int, seed: int, ignore_index: int = -100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < 0.2
    return labels.masked_fill(ignored, ignore_index)


def _loss_and_grads(fn, *inputs):
    loss = fn(*inputs)
    grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9)) + 1.5
    grads = torch.autograd.grad(loss, inputs, grad.to(loss.dtype))
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("h_shape", "vocab", "chunk"),
    [((3, 13, 32), 50, 8), ((37, 16), 20, 64), ((5, 16), 7, 1)],  # chunks that do not divide N
    ids=["3d", "chunk>rows", "chunk=1"],
)
def test_op_matches_unchunked(reduction, h_shape, vocab, chunk):
    h, w = _randn(*h_shape, seed=1), _randn(vocab, h_shape[-1], seed=2)
    labels = _labels(h_shape[:-1], vocab, seed=3)

    def reference(h, w):
        logits = F.linear(h, w).reshape(-1, vocab)
        return F.cross_entropy(logits, labels.reshape(-1), reduction=reduction)

    def chunked(h, w):
        return ops.chunked_linear_cross_entropy(h, w, labels, chunk, -100, reduction)

    ref_loss, ref_grads = _loss_and_grads(reference, h, w)
    loss, grads = _loss_and_grads(chunked, h, w)
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_soft_caps_each_chunk(reduction):
    """``softcap``: the loss of ``cap * tanh(logits / cap)``, forward and backward, against
    the unchunked float64 formula (logits large enough for the cap to bend them)."""
    h, w = _randn(3, 13, 32, seed=14), _randn(50, 32, seed=15)
    labels = _labels((3, 13), 50, seed=16)
    cap = 4.0

    def reference(h, w):
        logits = torch.tanh(F.linear(h.double(), w.double()) / cap) * cap
        return F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction=reduction)

    def chunked(h, w):
        return ops.chunked_linear_cross_entropy(h, w, labels, 8, -100, reduction, None, cap)

    ref_loss, ref_grads = _loss_and_grads(reference, h, w)
    loss, grads = _loss_and_grads(chunked, h, w)
    assert sqnr(loss, ref_loss) > 100
    assert min(sqnr(g, r) for g, r in zip(grads, ref_grads)) > 100
    uncapped = ops.chunked_linear_cross_entropy(h, w, labels, 8, -100, reduction)
    assert sqnr(uncapped, ref_loss) < 40  # the cap changes the loss


def test_op_ignore_index_and_all_ignored():
    h, w = _randn(6, 8, seed=4), _randn(11, 8, seed=5)
    labels = torch.tensor([3, 7, 7, 0, 10, 2])
    loss = ops.chunked_linear_cross_entropy(h, w, labels, 4, 7)
    ref = F.cross_entropy(F.linear(h, w), labels, ignore_index=7)
    torch.testing.assert_close(loss, ref)
    all_ignored = torch.full((6,), -100)
    assert ops.chunked_linear_cross_entropy(h, w, all_ignored, 4).isnan()  # as F.cross_entropy
    assert F.cross_entropy(F.linear(h, w), all_ignored).isnan()


def test_op_bfloat16_loss_in_out_dtype():
    h, w = _randn(2, 9, 32, seed=6, dtype=torch.bfloat16), _randn(40, 32, seed=7)
    w = w.detach().bfloat16().requires_grad_()
    labels = _labels((18,), 40, seed=8)
    loss = ops.chunked_linear_cross_entropy(h, w, labels, 5, -100, "mean", torch.float32)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels)  # transformers' recipe
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_opcheck():
    h, w = _randn(3, 13, 32, seed=10), _randn(50, 32, seed=11)
    labels = _labels((39,), 50, seed=12)
    for args in [
        (h.transpose(0, 1), w, labels, 8, -100, "mean", None),
        (
            h.detach().double(),
            w.detach().double(),
            labels.clamp(min=3),
            64,
            3,
            "none",
            torch.float32,
        ),
        (h, w, labels, 8, -100, "mean", None, 3.0),
    ]:
        torch.library.opcheck(ops.chunked_linear_cross_entropy, args)
    grad = torch.rand((), generator=torch.Generator().manual_seed(13)) + 0.5
    torch.library.opcheck(
        ops.chunked_linear_cross_entropy_backward,
        (grad, h.detach(), w.detach(), labels, 8, -100, "sum"),
    )
    torch.library.opcheck(
        ops.chunked_linear_cross_entropy_backward,
        (grad, h.detach(), w.detach(), labels, 8, -100, "mean", 3.0),
    )


def test_op_never_materializes_the_logits():
    rows, dim, vocab, chunk = 512, 32, 4096, 64
    h, w = _randn(rows, dim, seed=14), _randn(vocab, dim, seed=15)
    labels = _labels((rows,), vocab, seed=16)
    logits_bytes = rows * vocab * 4

    def chunked():
        ops.chunked_linear_cross_entropy(h, w, labels, chunk).backward()

    def unchunked():
        F.cross_entropy(F.linear(h, w), labels).backward()

    _, chunked_memory = measure(chunked)
    _, unchunked_memory = measure(unchunked)
    peak, largest = chunked_memory.peak, chunked_memory.largest
    ref_peak, ref_largest = unchunked_memory.peak, unchunked_memory.largest
    assert ref_largest >= logits_bytes  # the reference does hold the logits
    assert largest <= chunk * vocab * 4 < logits_bytes
    assert peak < logits_bytes / 2 < ref_peak


# ----------------------------------------------------------------- the handler on graphs


def _llama_batch(vocab: int = 256, seed: int = 20):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 16), generator=gen)
    labels = torch.randint(0, vocab, (2, 16), generator=gen)
    labels[0, :3] = -100  # F.cross_entropy's default ignore_index
    return tokens, labels


def _graph_loss_and_grads(gm, model, *inputs):
    for p in model.parameters():
        p.grad = None
    loss = gm(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_llama_loss_is_chunked_with_same_loss_and_grads():
    chunk_size = 7  # 32 rows: four full chunks and a partial one
    model = build_llama("tiny", with_loss=True, seed=0)
    tokens, labels = _llama_batch()
    gm = tg.capture(model, (tokens, labels))
    ref_loss, ref_grads = _graph_loss_and_grads(gm, model, tokens, labels)

    report = tg.PassManager([{"chunked_cross_entropy": {"chunk_size": chunk_size}}]).run(gm)

    assert report.matches == {"chunked_cross_entropy": 1}
    assert report.rule_matches["chunked_cross_entropy"]["flatten_ce"] == 1
    (record,) = report.records
    assert record.module_fqn == "" and len(record.replaced) == 3  # linear, flatten, CE
    targets = [n.target for n in gm.graph.nodes]
    assert aten.cross_entropy_loss.default not in targets
    assert targets.count(aten.linear.default) == 14  # 2 layers x 7; the output one is gone
    (fused,) = gm.graph.find_nodes(
        op="call_function", target=ops.chunked_linear_cross_entropy.default
    )
    assert fused.args[1].target == "model.output.weight" and fused.args[3:] == (
        chunk_size,
        -100,
        "mean",
        None,
    )
    loss, grads = _graph_loss_and_grads(gm, model, tokens, labels)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


class _Head(nn.Module):
    """An output projection and a loss written the other common ways."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.out = nn.Linear(32, 40, bias=False)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.style == "view":
            logits = self.out(h).view(-1, 40)
            return F.cross_entropy(logits, labels.view(-1), ignore_index=0, reduction="sum")
        if self.style == "reshape":
            return F.cross_entropy(self.out(h).reshape(-1, 40), labels.reshape(-1))
        return F.cross_entropy(self.out(h), labels, reduction="none")  # 2-D hidden states


@pytest.mark.parametrize(
    ("style", "h_shape", "rule"),
    [
        ("view", (2, 9, 32), "view_ce"),
        ("reshape", (3, 5, 32), "reshape_ce"),
        ("2d", (21, 32), "linear_ce"),
    ],
)
def test_other_loss_chains(style, h_shape, rule):
    torch.manual_seed(21)
    head = _Head(style)
    h = _randn(*h_shape, seed=22)
    labels = _labels(h_shape[:-1], 40, seed=23, ignore_index=0 if style == "view" else -100)
    gm = tg.capture(head, (h, labels))
    ref_loss, ref_grads = _loss_and_grads(lambda h, w: gm(h, labels), h, head.out.weight)

    report = tg.PassManager([{"chunked_cross_entropy": {"chunk_size": 4}}]).run(gm)

    assert report.rule_matches["chunked_cross_entropy"][rule] == 1
    loss, grads = _loss_and_grads(lambda h, w: gm(h, labels), h, head.out.weight)
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


def test_transformers_llama_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(24)
    model = transformers.LlamaForCausalLM(config)

    class LossOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, labels):
            return self.model(input_ids=tokens, labels=labels).loss

    wrapper = LossOnly()
    tokens, labels = _llama_batch(vocab=128, seed=25)
    gm = tg.capture(wrapper, (tokens, labels))
    ref_loss, ref_grads = _graph_loss_and_grads(gm, wrapper, tokens, labels)

    report = tg.PassManager([{"chunked_cross_entropy": {"chunk_size": 5}}]).run(gm)

    assert report.rule_matches["chunked_cross_entropy"]["transformers_ce"] == 1
    targets = {n.target for n in gm.graph.nodes}
    assert aten.cross_entropy_loss.default not in targets
    loss, grads = _graph_loss_and_grads(gm, wrapper, tokens, labels)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_rejections_say_why():
    class SoftTargets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(16, 10, bias=False)

        def forward(self, h, targets):
            return F.cross_entropy(self.out(h).flatten(0, 1), targets.flatten(0, 1))

    h = _randn(2, 3, 16, seed=26)
    targets = torch.softmax(_randn(2, 3, 10, seed=27).detach(), -1)
    gm = tg.capture(SoftTargets(), (h, targets))
    (ce,) = gm.graph.find_nodes(op="call_function", target=aten.cross_entropy_loss.default)
    explanation = tg.explain(ChunkedCrossEntropy.flatten_ce, ce, ChunkedCrossEntropy())
    assert not explanation.matched
    assert "not class indices" in str(explanation)


def test_options_are_validated():
    with pytest.raises(OptionError, match="chunk_size must be >= 1"):
        ChunkedCrossEntropy(chunk_size=0)
    with pytest.raises(OptionError, match="did you mean 'chunk_size'"):
        ChunkedCrossEntropy(chunksize=8)
