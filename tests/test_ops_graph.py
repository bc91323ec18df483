"""The custom ops survive ``torch.export`` (kept as ops in the graph) and ``torch.compile``
(forward and backward, matching eager)."""

from __future__ import annotations

import torch

import torchgraft.ops  # noqa: F401  (registers the ops)
from torchgraft.ops.numerics import sqnr

ops = torch.ops.torchgraft


class _AllFormats(torch.nn.Module):
    """Four stacked 64x64 linears, one per op."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(64, 64, generator=gen) / 8) for _ in range(4)
        )
        self.b = torch.nn.Parameter(torch.randn(64, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ops.float8_linear(x, self.w[0], self.b, "tensorwise")
        x = ops.int8_linear(x, self.w[1], None, "training", True, False, True)
        x = ops.mx_linear(x, self.w[2], self.b, "mxfp8")
        return ops.bitnet_linear(x, self.w[3], None)


def test_export_keeps_the_ops() -> None:
    model = _AllFormats()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(model, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    for op in (ops.float8_linear, ops.int8_linear, ops.mx_linear, ops.bitnet_linear):
        assert op.default in targets, f"{op} missing from exported graph: {targets}"
    assert torch.equal(ep.module()(x), model(x))


def test_compile_forward_and_backward_match_eager() -> None:
    def loss(x, w, b):
        y = ops.float8_linear(x, w, b, "rowwise")
        y = ops.int8_linear(y, w, b, "dynamic")
        y = ops.mx_linear(y, w, None, "mxfp4")
        y = ops.bitnet_linear(y, w, b)
        return y.square().mean()

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 64, generator=gen, requires_grad=True)
    w = (torch.randn(64, 64, generator=gen) / 8).requires_grad_()
    b = torch.randn(64, generator=gen, requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x, w, b)
    got_grads = torch.autograd.grad(got, (x, w, b))
    want = loss(x, w, b)
    want_grads = torch.autograd.grad(want, (x, w, b))
    for name, a, r in zip(("loss", "dX", "dW", "dbias"), (got, *got_grads), (want, *want_grads)):
        db = sqnr(a, r)
        assert db >= 100.0, f"compiled {name} differs from eager: SQNR {db:.1f} dB < 100 dB"
