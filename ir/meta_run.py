"""Run a custom op on meta tensors instead of through fake-tensor dispatch.

Tracing a replacement gives each new node its ``meta["val"]`` by running the op on the
inputs' fake tensors. For ops outside torch's own namespaces the fake-tensor mode keeps no
dispatch cache ("non-builtin" bypass), and each call costs 0.65 ms (2-3 ms the first time)
of Python dispatch: autograd wrapper, fake kernel lookup, output wrapping; a rewrite traces
such an op once per distinct signature. The op's fake function, which ``register_fake``
also installs as its Meta kernel, gives the same shapes, strides and dtypes on meta tensors
in about 0.2 ms (``benchmarks/rewrite_scaling.py``'s linear op, measured in a trace). The
result is wrapped back as fake tensors on the inputs' device.

Only the plain case takes this path: a functional op (no argument it writes to, no output
aliasing an input), tensor inputs that are static-shaped, strided, zero-offset fake tensors
of one fake mode on one device, no device among the other arguments, and meta tensors out.
Anything else, and any op that raises on meta tensors (a fake function that needs
``torch.library.get_ctx()``, for example for a data-dependent size), returns
:data:`NOT_RUN` and goes through the fake-tensor mode as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_unflatten

BUILTIN_NAMESPACES = frozenset({"aten", "prims", "prim"})
"""Namespaces whose ops the fake-tensor mode caches (and treats specially): left to it."""

NOT_RUN = object()
"""Returned when the op must go through the fake-tensor mode."""


def run_on_meta(fake_mode: FakeTensorMode, op: Any, args: tuple, kwargs: dict) -> Any:
    """``op(*args, **kwargs)`` on meta stand-ins of its fake tensor arguments, the outputs
    as fake tensors of ``fake_mode``; :data:`NOT_RUN` where that would not be faithful."""
    if not _takes_meta_path(op):
        return NOT_RUN
    flat, spec = tree_flatten((args, kwargs))
    device = None
    for i, value in enumerate(flat):
        if isinstance(value, torch.device):
            return NOT_RUN
        if not isinstance(value, torch.Tensor):
            continue
        if not _is_plain_fake(value, fake_mode) or (device is not None and value.device != device):
            return NOT_RUN
        device = value.device
        flat[i] = meta_like(value, requires_grad=value.requires_grad)
    if device is None:
        return NOT_RUN
    meta_args, meta_kwargs = tree_unflatten(flat, spec)
    try:
        result = op(*meta_args, **meta_kwargs)
    except Exception:
        return NOT_RUN  # the fake-tensor mode runs it again and raises its own error
    outputs, out_spec = tree_flatten(result)
    if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in outputs):
        return NOT_RUN
    wrapped = [
        fake_from_meta(fake_mode, t, device) if isinstance(t, torch.Tensor) else t for t in outputs
    ]
    return tree_unflatten(wrapped, out_spec)


def meta_like(value: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """An empty meta tensor with ``value``'s shape, strides and dtype."""
    return torch.empty_strided(
        value.shape, value.stride(), dtype=value.dtype, device="meta", requires_grad=requires_grad
    )


def fake_from_meta(
    fake_mode: FakeTensorMode, meta: torch.Tensor, device: torch.device
) -> FakeTensor:
    """A fake tensor of ``fake_mode`` on ``device`` backed by the fresh meta tensor ``meta``.
    Built directly: the converter's ``from_meta_and_device`` also files it in a weak memo
    (meta tensor → fake), which nothing looks up for a tensor made here and costs about twice
    the construction."""
    return FakeTensor(fake_mode, meta, device)


def _takes_meta_path(op: Any) -> bool:
    """A functional op outside torch's namespaces: no argument it writes to, no output that
    aliases an input (a view op's result must share its input's fake storage)."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace in BUILTIN_NAMESPACES:
        return False
    schema = op._schema
    return all(a.alias_info is None for a in (*schema.arguments, *schema.returns))


def _is_plain_fake(value: torch.Tensor, fake_mode: FakeTensorMode) -> bool:
    return (
        type(value) is FakeTensor
        and value.fake_mode is fake_mode
        and value.layout == torch.strided
        and not value._has_symbolic_sizes_strides
        and value.storage_offset() == 0
    )
