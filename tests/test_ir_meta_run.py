"""Custom ops in replacements get their ``meta["val"]`` from meta kernels, as fake mode would
give it, and every case the meta path cannot serve faithfully goes through fake mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
    free_unbacked_symbols,
)

import torchgraft as tg
from torchgraft.ir.meta_run import NOT_RUN, run_on_meta

aten = torch.ops.aten


@torch.library.custom_op("torchgraft_meta_test::split_scale", mutates_args=())
def split_scale(
    x: torch.Tensor, w: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y = x @ w.t() * scale
    return y.t().contiguous().t(), y.amax(-1)


@split_scale.register_fake
def _(x, w, scale):
    rows, cols = x.shape[0], w.shape[0]
    column_major = x.new_empty((cols, rows)).t()  # non-contiguous strides, as the kernel's
    return column_major, x.new_empty((rows,))


@torch.library.custom_op("torchgraft_meta_test::scale_", mutates_args=("x",))
def scale_(x: torch.Tensor, factor: float) -> None:
    x.mul_(factor)


@scale_.register_fake
def _(x, factor):
    return None


@torch.library.custom_op("torchgraft_meta_test::positives", mutates_args=())
def positives(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0]


@positives.register_fake
def _(x):
    count = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((count,))


@torch.library.custom_op("torchgraft_meta_test::to_device", mutates_args=())
def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device).clone()


@to_device.register_fake
def _(x, device):
    return torch.empty_like(x, device=device)


_VIEWS = torch.library.Library("torchgraft_meta_test", "FRAGMENT")
_VIEWS.define("first_rows(Tensor(a) x) -> Tensor(a)")
_VIEWS.impl("first_rows", lambda x: x[:2], "CompositeExplicitAutograd")


def _fakes(mode: FakeTensorMode, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [mode.from_tensor(t) for t in tensors]


def _facts(value: torch.Tensor) -> tuple:
    return value.shape, value.stride(), value.dtype, value.device, value.requires_grad


def test_meta_path_gives_what_fake_mode_gives():
    mode = FakeTensorMode()
    x, w = _fakes(mode, torch.randn(6, 4), nn.Parameter(torch.randn(5, 4)))
    op = torch.ops.torchgraft_meta_test.split_scale.default
    on_meta = run_on_meta(mode, op, (x, w, 0.5), {})
    with mode:
        through_fake = op(x, w, 0.5)
    assert on_meta is not NOT_RUN
    assert all(type(t) is FakeTensor and t.fake_mode is mode for t in on_meta)
    assert [_facts(t) for t in on_meta] == [_facts(t) for t in through_fake]
    assert on_meta[0].stride() == (1, 6) and on_meta[0].requires_grad


def test_cases_the_meta_path_leaves_to_fake_mode():
    mode = FakeTensorMode()
    x, w = _fakes(mode, torch.randn(6, 4), torch.randn(5, 4))
    (other,) = _fakes(FakeTensorMode(), torch.randn(5, 4))
    ops = torch.ops.torchgraft_meta_test
    refused = {
        "builtin op": (aten.mm.default, (x, w.t()), {}),
        "mutating op": (ops.scale_.default, (x, 2.0), {}),
        "view op": (ops.first_rows.default, (x,), {}),
        "data-dependent size": (ops.positives.default, (x,), {}),
        "device argument": (ops.to_device.default, (x, torch.device("cpu")), {}),
        "tensors of another fake mode": (ops.split_scale.default, (x, other, 1.0), {}),
        "non-zero storage offset": (ops.split_scale.default, (x[1:], w, 1.0), {}),
        "no tensor": (ops.split_scale.default, (1.0,), {}),
    }
    for case, (op, args, kwargs) in refused.items():
        assert run_on_meta(mode, op, args, kwargs) is NOT_RUN, case


def test_symbolic_sizes_go_through_fake_mode():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(6, 4), symbolic_context=context)
    (w,) = _fakes(mode, torch.randn(5, 4))
    assert x._has_symbolic_sizes_strides
    op = torch.ops.torchgraft_meta_test.split_scale.default
    assert run_on_meta(mode, op, (x, w, 1.0), {}) is NOT_RUN


class MatmulSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return aten.mm.default(x, self.w.t()).sum()


class ToCustomOps(tg.Handler):
    """``x @ w.t()`` → the custom op's first output; ``sum`` → the sum of the positives."""

    @tg.rule
    def matmul(x, w):
        return aten.mm.default(x, aten.t.default(w))

    @matmul.replacement
    def _(x, w):
        return torch.ops.torchgraft_meta_test.split_scale.default(x, w, 1.0)[0]

    @tg.rule
    def total(y):
        return aten.sum.default(y)

    @total.replacement
    def _(y):
        return aten.sum.default(torch.ops.torchgraft_meta_test.positives.default(y))


def test_rewritten_graph_carries_the_custom_ops_values_and_runs():
    model = MatmulSum()
    gm = tg.capture(model, (torch.randn(6, 4),))
    report = tg.PassManager([ToCustomOps]).run(gm)
    assert report.matches == {"ToCustomOps": 2}
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    split = calls[torch.ops.torchgraft_meta_test.split_scale.default].meta["val"]
    assert [tuple(t.shape) for t in split] == [(6, 5), (6,)] and split[0].stride() == (1, 6)
    kept = calls[torch.ops.torchgraft_meta_test.positives.default].meta["val"]
    assert free_unbacked_symbols(kept.shape[0])  # fake mode's unbacked size: not the meta path
    for _ in range(3):
        fresh = torch.randn(6, 4)
        y = fresh @ model.w.detach().t()
        torch.testing.assert_close(gm(fresh), y[y > 0].sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_path_keeps_dtype_and_grad(dtype):
    mode = FakeTensorMode()
    x = mode.from_tensor(torch.randn(3, 4, dtype=dtype).requires_grad_())
    (w,) = _fakes(mode, torch.randn(2, 4, dtype=dtype))
    out, peak = run_on_meta(
        mode, torch.ops.torchgraft_meta_test.split_scale.default, (x, w, 2.0), {}
    )
    assert (out.dtype, peak.dtype) == (dtype, dtype)
    assert out.requires_grad and peak.requires_grad
