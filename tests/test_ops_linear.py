"""Numerics of the ``torchgraft::*_linear`` ops against float64 references of their formulas.

The references below are written from the formulas (DESIGN.md, "Numerics references"),
independently of ``torchgraft.ops``, and computed in float64. Every op is checked per
mode/recipe/format on several shapes (3-D activations, odd token counts, ``K`` and ``N``
not multiples of 8) for the output and the gradients ``dX``, ``dW``, ``dbias``:

* against its reference: SQNR >= 40 dB;
* against the float32 ``F.linear``: the format's tolerance (float8: output 18 dB, grads
  17 dB; int8: 20 dB; mxfp8: 18 dB; mxfp4: 8 dB; DESIGN.md states the MX ones for the
  output, here the gradients are held to the same bound; BitNet has no float32 tolerance,
  its ternary weights are not an approximation of ``W``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import torchgraft.ops  # noqa: F401  (registers the ops)
from torchgraft.ops.numerics import sqnr

ops = torch.ops.torchgraft
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

REF_DB = 40.0

# (x shape, out_features N, with bias)
SHAPES = [
    ((3, 5, 64), 48, True),
    ((7, 32), 48, False),
    ((2, 11, 96), 40, True),
    ((9, 36), 20, True),  # K, N not multiples of 8 (not MX: K % 32 != 0)
]

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # y, dX, dW (2-D, float64)


# ---------------------------------------------------------------- float64 references


def _q_float8_tensorwise(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    scale = float(torch.tensor(fmax / max(t.abs().max().item(), 1e-12), dtype=torch.float32))
    return (t * scale).clamp(-fmax, fmax).to(dtype).double() / scale


def _q_float8_rowwise(t: torch.Tensor, dim: int) -> torch.Tensor:
    amax = t.abs().amax(dim, keepdim=True).clamp(min=1e-12)
    scale = 2.0 ** torch.floor(torch.log2(448.0 / amax))
    return (t * scale).clamp(-448.0, 448.0).to(E4M3).double() / scale


def ref_float8(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, recipe: str) -> Grads:
    if recipe == "tensorwise":
        qx, qw = _q_float8_tensorwise(x, E4M3), _q_float8_tensorwise(w, E4M3)
        qg = _q_float8_tensorwise(g, E5M2)
        return qx @ qw.T, qg @ qw, qg.T @ qx
    q = _q_float8_rowwise
    return q(x, 1) @ q(w, 1).T, q(g, 1) @ q(w, 0), q(g, 0).T @ q(x, 0)


def _q_int8(t: torch.Tensor, dim: int) -> torch.Tensor:
    s = t.abs().amax(dim, keepdim=True) / 127.0
    return (t / s).round().clamp(-128, 127) * s


def ref_int8(
    x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, mode: str, fwd=True, gi=True, gw=True
) -> Grads:
    q = _q_int8
    if mode == "weight_only":
        return x @ q(w, 1).T, g @ q(w, 1), g.T @ x
    if mode == "dynamic":
        return q(x, 1) @ q(w, 1).T, g @ q(w, 1), g.T @ q(x, 1)
    y = q(x, 1) @ q(w, 1).T if fwd else x @ w.T
    dx = q(g, 1) @ q(w, 0) if gi else g @ w
    dw = q(g, 0).T @ q(x, 0) if gw else g.T @ x
    return y, dx, dw


_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def fp4_nearest_even(v: torch.Tensor) -> torch.Tensor:
    """Nearest fp4 e2m1 value by search over the grid; ties to the even code (mantissa 0)."""
    mag = v.abs().clamp(max=6.0)
    dist = (mag.unsqueeze(-1) - _FP4_GRID).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    even_code = torch.arange(8) % 2 == 0
    idx = (nearest.double() * (1.0 + even_code.double())).argmax(-1)
    return torch.sign(v) * _FP4_GRID[idx]


def _q_mx(t: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    emax = 8 if fmt == "mxfp8" else 2
    t = t.movedim(dim, -1)
    out = torch.empty_like(t)
    for start in range(0, t.shape[-1], 32):  # the last block may be partial
        block = t[..., start : start + 32]
        e = (torch.floor(torch.log2(block.abs().amax(-1, keepdim=True))) - emax).clamp(-127, 127)
        v = block / 2.0**e
        elems = v.clamp(-448, 448).to(E4M3).double() if fmt == "mxfp8" else fp4_nearest_even(v)
        out[..., start : start + 32] = elems * 2.0**e
    return out.movedim(-1, dim)


def ref_mx(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, fmt: str) -> Grads:
    def q(t: torch.Tensor, dim: int) -> torch.Tensor:
        return _q_mx(t, dim, fmt)

    return q(x, 1) @ q(w, 1).T, q(g, 1) @ q(w, 0), q(g, 0).T @ q(x, 0)


def ref_bitnet(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> Grads:
    gamma = w.abs().mean().clamp(min=1e-5)
    w_hat = (w / gamma).round().clamp(-1, 1) * gamma
    s = 127.0 / x.abs().amax(1, keepdim=True).clamp(min=1e-5)
    x_hat = (x * s).round().clamp(-128, 127) / s
    return x_hat @ w_hat.T, g @ w_hat, g.T @ x_hat


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    name: str
    op: Callable[..., torch.Tensor]  # op(x, w, bias, *args)
    args: tuple[object, ...]
    ref: Callable[..., Grads]  # ref(x2d, w, g2d, *args), float64
    out_db: float | None  # tolerance vs float32 F.linear; None: not an approximation
    grad_db: float | None
    needs_k32: bool = False

    def __str__(self) -> str:
        return self.name

    def __call__(self, x, w, b) -> torch.Tensor:
        return self.op(x, w, b, *self.args)


CONFIGS = [
    Config("float8-tensorwise", ops.float8_linear, ("tensorwise",), ref_float8, 18.0, 17.0),
    Config("float8-rowwise", ops.float8_linear, ("rowwise",), ref_float8, 18.0, 17.0),
    Config("int8-weight_only", ops.int8_linear, ("weight_only",), ref_int8, 20.0, 20.0),
    Config("int8-dynamic", ops.int8_linear, ("dynamic",), ref_int8, 20.0, 20.0),
    Config("int8-training", ops.int8_linear, ("training",), ref_int8, 20.0, 20.0),
    Config(
        "int8-training-float_grad_input",
        ops.int8_linear,
        ("training", True, False, True),
        ref_int8,
        20.0,
        20.0,
    ),
    Config(
        "int8-training-float_fwd_and_grad_weight",
        ops.int8_linear,
        ("training", False, True, False),
        ref_int8,
        20.0,
        20.0,
    ),
    Config("mxfp8", ops.mx_linear, ("mxfp8",), ref_mx, 18.0, 18.0, needs_k32=True),
    Config("mxfp4", ops.mx_linear, ("mxfp4",), ref_mx, 8.0, 8.0, needs_k32=True),
    Config("bitnet", ops.bitnet_linear, (), ref_bitnet, None, None),
]

CASES = [
    pytest.param(cfg, i, id=f"{cfg}-{'x'.join(map(str, shape[0]))}-N{shape[1]}")
    for cfg in CONFIGS
    for i, shape in enumerate(SHAPES)
    if not (cfg.needs_k32 and shape[0][-1] % 32)
]


def _inputs(cfg: Config, shape_idx: int, dtype: torch.dtype = torch.float32):
    """Fresh random x, w, bias (or None) and grad_output; the seed varies per case."""
    x_shape, n, with_bias = SHAPES[shape_idx]
    gen = torch.Generator().manual_seed(1009 * CONFIGS.index(cfg) + 31 * shape_idx + 7)
    k = x_shape[-1]
    x = 2.0 * torch.randn(x_shape, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if with_bias else None
    g = torch.randn(*x_shape[:-1], n, generator=gen)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b) if t is not None]
    return (*leaves, None) if b is None else tuple(leaves), g.to(dtype)


def _run(fn: Callable[..., torch.Tensor], x, w, b, g) -> list[torch.Tensor]:
    """Output and gradients (dX, dW[, dbias]) of ``fn(x, w, b)`` for grad_output ``g``."""
    y = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, g)]


def _reference(cfg: Config, x, w, b, g) -> list[torch.Tensor]:
    k, n = x.shape[-1], w.shape[0]
    g2d = g.detach().double().reshape(-1, n)
    y, dx, dw = cfg.ref(x.detach().double().reshape(-1, k), w.detach().double(), g2d, *cfg.args)
    out = [y.reshape(*x.shape[:-1], n), dx.reshape(x.shape), dw]
    if b is not None:
        out[0] = out[0] + b.detach().double()
        out.append(g2d.sum(0))
    return out


NAMES = ("Y", "dX", "dW", "dbias")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(("cfg", "shape_idx"), CASES)
def test_matches_float64_reference(cfg: Config, shape_idx: int) -> None:
    (x, w, b), g = _inputs(cfg, shape_idx)
    got = _run(cfg, x, w, b, g)
    want = _reference(cfg, x, w, b, g)
    dbs = {name: sqnr(a, r) for name, a, r in zip(NAMES, got, want, strict=False)}
    print(f"{cfg} {tuple(x.shape)} vs float64 reference (dB):", dbs)
    for name, db in dbs.items():
        assert db >= REF_DB, f"{cfg} {name}: SQNR vs reference {db:.1f} dB < {REF_DB} dB"


@pytest.mark.parametrize(("cfg", "shape_idx"), [c for c in CASES if c.values[0].out_db])
def test_close_to_float32_linear(cfg: Config, shape_idx: int) -> None:
    (x, w, b), g = _inputs(cfg, shape_idx)
    got = _run(cfg, x, w, b, g)
    want = _run(F.linear, x, w, b, g)
    dbs = {name: sqnr(a, r) for name, a, r in zip(NAMES, got, want, strict=False)}
    print(f"{cfg} {tuple(x.shape)} vs float32 F.linear (dB):", dbs)
    assert dbs["Y"] >= cfg.out_db, f"{cfg} Y: {dbs['Y']:.1f} dB < {cfg.out_db} dB"
    for name in ("dX", "dW"):
        if cfg.grad_db is not None:
            assert dbs[name] >= cfg.grad_db, f"{cfg} {name}: {dbs[name]:.1f} dB < {cfg.grad_db} dB"


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_bfloat16_keeps_dtypes(cfg: Config) -> None:
    (x, w, b), g = _inputs(cfg, 0, dtype=torch.bfloat16)
    y, dx, dw, db = _run(cfg, x, w, b, g)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16,) * 4
    assert (y.shape, dx.shape, dw.shape, db.shape) == (
        (*x.shape[:-1], w.shape[0]),
        x.shape,
        w.shape,
        b.shape,
    )
    if cfg.out_db is not None:
        want = F.linear(x.float(), w.float(), b.float())
        assert sqnr(y, want) >= cfg.out_db, f"{cfg} bf16 Y: {sqnr(y, want):.1f} dB"


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_1d_input_and_frozen_weight(cfg: Config) -> None:
    """``x [K]`` works as in ``F.linear``; a frozen ``w`` gets no gradient, ``dX`` unchanged."""
    (x, w, b), g = _inputs(cfg, 0)
    y, dx, _, db = _run(cfg, x[0, 0], w, b, g[0, 0])
    assert y.shape == (w.shape[0],) and dx.shape == x.shape[-1:] and torch.equal(db, g[0, 0])
    x_only = x.detach().requires_grad_()
    cfg(x_only, w.detach(), b.detach()).backward(g)
    assert torch.equal(x_only.grad, _run(cfg, x, w, b, g)[1])


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("shape_idx", [0, 1])  # 3-D (reshaped back) and 2-D activations
def test_output_can_be_modified_in_place(cfg: Config, shape_idx: int) -> None:
    """As ``F.linear``'s: ``y += other`` (transformers' Falcon adds its attention output to
    its MLP projection's in place) trains like ``y + other``, bit for bit."""
    (x, w, b), g = _inputs(cfg, shape_idx)
    other = torch.randn_like(g)
    in_place = _run(lambda *args: cfg(*args).add_(other), x, w, b, g)
    out_of_place = _run(lambda *args: cfg(*args) + other, x, w, b, g)
    for name, a, r in zip(NAMES, in_place, out_of_place, strict=False):
        assert torch.equal(a, r), f"{cfg} {name} differs after an in-place add"


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_opcheck_forward(cfg: Config) -> None:
    (x, w, b), _ = _inputs(cfg, 0)
    torch.library.opcheck(cfg.op, (x, w, b, *cfg.args))


@pytest.mark.parametrize(
    ("op", "args"),
    [
        (ops.float8_linear_grad_input, ("tensorwise",)),
        (ops.float8_linear_grad_weight, ("rowwise",)),
        (ops.int8_linear_grad_input, ("training", True)),
        (ops.int8_linear_grad_weight, ("dynamic", True)),
        (ops.mx_linear_grad_input, ("mxfp4",)),
        (ops.mx_linear_grad_weight, ("mxfp8",)),
        (ops.bitnet_linear_grad_input, ()),
        (ops.bitnet_linear_grad_weight, ()),
    ],
    ids=str,
)
def test_opcheck_backward_ops(op, args) -> None:
    gen = torch.Generator().manual_seed(5)
    g, x, w = (torch.randn(s, generator=gen) for s in ((3, 5, 48), (3, 5, 64), (48, 64)))
    second = w if "grad_input" in str(op) else x
    torch.library.opcheck(op, (g, second, *args))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, w: ops.float8_linear(x, w, None, "blockwise"), "recipe must be one of"),
        (lambda x, w: ops.int8_linear(x, w, None, "int4"), "mode must be one of"),
        (lambda x, w: ops.int8_linear(x, w, None, "dynamic", True, False), "only apply to"),
        (lambda x, w: ops.mx_linear(x, w, None, "mxfp6"), "format must be one of"),
        (lambda x, w: ops.mx_linear(x[..., :40], w[:, :40], None, "mxfp8"), "divisible by 32"),
        (lambda x, w: ops.bitnet_linear(x, w[:, :32], None), "K differs"),
        (lambda x, w: ops.bitnet_linear(x, w, torch.zeros(3)), "bias must have shape"),
        (lambda x, w: ops.float8_linear(x, w.double(), None, "rowwise"), "share a dtype"),
    ],
)
def test_bad_arguments_raise(call, message: str) -> None:
    x, w = torch.randn(4, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match=message):
        call(x, w)
