"""Capture: shared parameters, metadata on nodes, and errors that quote the failing line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft as tg


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent branch: torch.export cannot capture it
            return y.relu()
        return y


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_capture_shares_parameters_and_has_metadata(llama, tokens, method):
    gm = tg.capture(llama, (tokens,), method=method)
    params = dict(llama.named_parameters())
    assert {n for n, _ in gm.named_parameters()} == set(params)
    assert all(p is params[n] for n, p in gm.named_parameters())
    torch.testing.assert_close(gm(tokens), llama(tokens))
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert all("val" in n.meta for n in calls)
    linears = [n for n in calls if "linear" in str(n.target)]
    assert len(linears) == 15
    assert {tg.Match.__name__}  # public name exists
    from torchgraft.ir.provenance import module_fqn, user_source

    assert module_fqn(linears[0]) == "layers.0.attention.wq"
    assert "llama.py" in user_source(linears[0])


def test_symbolic_trace_graph_is_torch_level(llama, tokens):
    gm = tg.capture(llama, (tokens,), method="symbolic_trace")
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default not in targets
    assert torch._C._nn.linear in targets


def test_export_failure_quotes_user_line_and_suggests_other_method():
    with pytest.raises(tg.CaptureError) as info:
        tg.capture(DataDependent(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "test_capture.py" in message and "if y.sum() > 0" in message
    assert "method='symbolic_trace'" in message


def test_symbolic_trace_failure_suggests_export():
    with pytest.raises(tg.CaptureError) as info:
        tg.capture(DataDependent(), (torch.randn(2, 8),), method="symbolic_trace")
    assert "if y.sum() > 0" in str(info.value) and "method='export'" in str(info.value)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown capture method"):
        tg.capture(nn.ReLU(), (torch.randn(2),), method="jit")


def test_same_tensor_twice_is_captured_as_two_inputs():
    from torchgraft.models import build_llama

    model = build_llama("tiny", with_loss=True)
    tokens = torch.randint(0, 256, (2, 16))
    gm = tg.capture(model, (tokens, tokens))
    labels = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(gm(tokens, labels), model(tokens, labels))
