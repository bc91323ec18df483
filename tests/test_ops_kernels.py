"""The kernel choice of the low-precision ops: native and emulated GEMMs agree, and ``auto``
follows the probe (a fake one here, so nothing depends on this machine's instruction set)."""

from __future__ import annotations

import logging

import pytest
import torch

import torchgraft as tg
import torchgraft.ops  # noqa: F401  (registers the ops)
from torchgraft.handlers.options import OptionError
from torchgraft.models import build_llama
from torchgraft.ops import kernels
from torchgraft.ops.numerics import sqnr

ops = torch.ops.torchgraft
CPU = torch.device("cpu")
E4M3 = (torch.float8_e4m3fn, torch.float8_e4m3fn)

# op, its arguments after (x, w, bias) without the kernel
OPS = [
    pytest.param(ops.float8_linear.default, ("tensorwise",), id="float8-tensorwise"),
    pytest.param(ops.float8_linear.default, ("rowwise",), id="float8-rowwise"),
    pytest.param(ops.int8_linear.default, ("training", True, True, True), id="int8-training"),
    pytest.param(ops.int8_linear.default, ("dynamic", True, True, True), id="int8-dynamic"),
    pytest.param(ops.bitnet_linear.default, (), id="bitnet"),
]


def _forward_backward(op, config, kernel, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 37, 96, generator=gen) * 4).requires_grad_()
    w = torch.randn(80, 96, generator=gen).requires_grad_()
    b = torch.randn(80, generator=gen).requires_grad_()
    grad = torch.randn(3, 37, 80, generator=gen)
    y = op(x, w, b, *config, kernel)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize(("op", "config"), OPS)
@pytest.mark.parametrize("seed", [0, 1])
def test_native_and_emulated_agree(op, config, seed):
    native = _forward_backward(op, config, "native", seed)
    emulated = _forward_backward(op, config, "emulated", seed)
    for name, a, b in zip(("output", "dX", "dW", "dbias"), native, emulated):
        assert torch.count_nonzero(a) > 0.9 * a.numel(), name  # a real signal, not zeros
        assert sqnr(b, a) >= 100.0, f"{name}: {sqnr(b, a):.1f} dB"


def _fake_probe(native_s, emulated_s=1e-3, error=None):
    calls = []

    def probe(kind, device, dtypes):
        calls.append((kind, device, dtypes))
        return kernels.ProbeResult(native_s, emulated_s, error)

    return probe, calls


@pytest.mark.parametrize(
    ("native_s", "error", "expected"),
    [
        (1.0, None, "emulated"),  # a reference kernel: 1000x the emulation
        (1e-3 * kernels.NATIVE_SLOWDOWN_ALLOWED, None, "native"),  # about as fast: native
        (None, "RuntimeError: no kernel", "emulated"),  # the native kernel raised
    ],
)
def test_auto_follows_the_probe_once_per_key_and_logs_it(
    native_s, error, expected, caplog, monkeypatch
):
    monkeypatch.delenv("TORCHGRAFT_KERNEL", raising=False)
    probe, calls = _fake_probe(native_s, error=error)
    with kernels.use_probe(probe), caplog.at_level(logging.INFO, logger="torchgraft"):
        assert kernels.resolve("auto", "float8", CPU, E4M3) == expected
        assert kernels.resolve("auto", "float8", CPU, E4M3) == expected
        assert kernels.resolve("auto", "int8", CPU, (torch.int8, torch.int8)) == expected
    assert len(calls) == 2  # one probe per (kind, device, dtypes), then the cache
    messages = [r.getMessage() for r in caplog.records if "GEMM" in r.getMessage()]
    assert len(messages) == 2 and f"runs {expected}" in messages[0]
    if error:
        assert "unavailable (RuntimeError: no kernel)" in messages[0]


def test_forced_kernels_and_the_environment_override(monkeypatch):
    probe, calls = _fake_probe(1.0)
    with kernels.use_probe(probe):
        assert kernels.resolve("native", "float8", CPU, E4M3) == "native"
        assert kernels.resolve("emulated", "int8", CPU, (torch.int8, torch.int8)) == "emulated"
        monkeypatch.setenv("TORCHGRAFT_KERNEL", "native")
        assert kernels.resolve("auto", "float8", CPU, E4M3) == "native"
        assert kernels.resolve("emulated", "float8", CPU, E4M3) == "emulated"  # explicit wins
        monkeypatch.setenv("TORCHGRAFT_KERNEL", "fast")
        with pytest.raises(ValueError, match="TORCHGRAFT_KERNEL must be one of"):
            kernels.resolve("auto", "float8", CPU, E4M3)
    assert calls == []  # nothing forced needs a probe
    with pytest.raises(ValueError, match="kernel must be one of"):
        ops.float8_linear(torch.randn(4, 16), torch.randn(16, 16), None, "tensorwise", "fast")


def test_the_op_runs_the_kernel_the_probe_chose(monkeypatch):
    """A slow native probe makes auto emulate: the op's result is the emulated one bitwise."""
    monkeypatch.delenv("TORCHGRAFT_KERNEL", raising=False)
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    emulated = ops.float8_linear(x, w, None, "tensorwise", "emulated")
    native = ops.float8_linear(x, w, None, "tensorwise", "native")
    for native_s, expected in [(1.0, emulated), (1e-4, native)]:
        with kernels.use_probe(_fake_probe(native_s)[0]):
            assert torch.equal(ops.float8_linear(x, w, None, "tensorwise", "auto"), expected)


@pytest.mark.parametrize("name", ["float8", "int8", "bitnet"])
def test_handlers_pass_their_kernel_option_to_the_op(name):
    model = build_llama("tiny", with_loss=True)
    tokens = torch.randint(0, 256, (2, 16))
    gm = tg.capture(model, (tokens, tokens))
    tg.PassManager([{name: {"kernel": "emulated"}}]).run(gm)
    kernels_used = {
        n.args[-1]
        for n in gm.graph.nodes
        if str(n.target).startswith("torchgraft.") and "linear" in str(n.target)
    }
    assert kernels_used == {"emulated"}
    with pytest.raises(OptionError, match="kernel"):
        tg.get_handler(name)(kernel="fast")


def test_mx_has_no_native_kernel_option():
    with pytest.raises(OptionError, match="has no option 'kernel'"):
        tg.get_handler("mx")(kernel="native")


def test_a_bad_environment_kernel_is_bad_input_before_any_work(monkeypatch, capsys, tmp_path):
    from torchgraft import cli

    monkeypatch.setenv("TORCHGRAFT_KERNEL", "fast")
    assert cli.main(["run", "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "TORCHGRAFT_KERNEL must be one of" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
