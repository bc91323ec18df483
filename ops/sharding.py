"""DTensor support for every ``torchgraft::`` op, so tensor parallelism composes with any
conversion without special cases keyed on handler names.

Two kinds of support, chosen by what makes a sharded run compute what one process computes:

* **Placement rules** (``register_sharding``) for ops whose result on shards is exact:
  ``rms_norm`` (shard any dim but the normalized last one), ``flex_attention`` and its
  backward (shard batch or heads), the chunked cross-entropy (replicated; row shards for
  ``"sum"`` / ``"none"``). DTensor redistributes the inputs to an accepted placement and runs
  the op on the local shards.
* **Distributed execution** (``torch.library.register_torch_dispatch`` on ``DTensor``) for the
  quantized linears (``float8``, ``int8``, ``mx``, ``bitnet``; forward, grad-input and
  grad-weight ops). Their quantization statistics (tensorwise amax, per-row amax along a
  contraction dim, BitNet's ``mean|W|``) span whole tensors, so the op run on a shard would
  quantize with the shard's statistics, not the global ones (e.g. tensorwise float8 on a
  row shard of ``W``). Instead the op's own Python implementation runs on the DTensors: each
  reduction in it becomes a global one (an all-reduce MAX/SUM over the sharded mesh dims,
  e.g. the global amax of tensorwise float8) and each GEMM (``_scaled_mm``, ``mm``,
  ``_int_mm``) follows DTensor's matmul rules, so results match the single-process op up to
  float summation order.

Three gaps of DTensor on CPU (torch 2.13) that the above relies on are filled here:
``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward: what SDPA runs on CPU) and
``aten._int_mm`` had no rule; ``aten._scaled_mm``'s rule rejects row-wise scales with a
sharded contraction dim and falls back to gathering float8 operands, which gloo cannot send.

Finally, :func:`gather_cast` and :func:`scatter_cast` say when an op's activation, or its
output's gradient, may be all-gathered in float8 (the communication saving of float8 tensor
parallelism), and :func:`dtensor_support` how (or whether) an op runs on DTensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import Placement

from . import bitnet, chunked_ce, flex, float8, int8, mx, norm, onednn  # noqa: F401  (registers the ops)
from .quant import saturating_cast

__all__ = [
    "dtensor_support",
    "gather_cast",
    "gather_float8",
    "scatter_cast",
    "scatter_float8_grad",
    "torchgraft_ops",
]

aten = torch.ops.aten
tg_ops = torch.ops.torchgraft
_R = Replicate()
_E4M3, _E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PlacementList = list[Placement | None]
Strategies = list[tuple[PlacementList, PlacementList]]
"""``register_sharding``'s answer: ``(output placements, input placements)`` per strategy."""


# --- placement rules -------------------------------------------------------------------


@register_sharding(tg_ops.rms_norm.default)
def _rms_norm(x: DTensorSpec, weight: DTensorSpec, eps: float) -> Strategies:
    # Each row is normalized over the last dim: any other dim may be sharded.
    strategies: Strategies = [([_R], [_R, _R, None])]
    strategies += [([Shard(d)], [Shard(d), _R, None]) for d in range(x.ndim - 1)]
    return strategies


def _register_attention_rule(op: torch._ops.OpOverload) -> None:
    """Attention is independent per batch row and per head: every tensor of ``op`` is
    ``[B, H, ...]`` and may be replicated or sharded on dim 0 or 1 — except ``doc_ids``
    (``[B, L]``: sharded with the batch only) and ``attn_mask`` (broadcast dims replicated).
    """
    names = [argument.name for argument in op._schema.arguments]
    outputs = len(op._schema.returns)

    def rule(*args: Any, **kwargs: Any) -> Strategies:
        values = {**dict(zip(names, args)), **kwargs}

        def placement(name: str, dim: int | None) -> Placement | None:
            value = values.get(name)
            if not isinstance(value, DTensorSpec):
                return None
            if dim is None or (name == "doc_ids" and dim == 1):
                return _R
            if name == "attn_mask" and value.shape[dim] == 1:
                return _R
            return Shard(dim)

        return [
            ([_R if dim is None else Shard(dim)] * outputs, [placement(n, dim) for n in names])
            for dim in (None, 0, 1)
        ]

    register_sharding(op)(rule)


for _op in (
    tg_ops.flex_attention.default,
    tg_ops.flex_attention_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
):
    _register_attention_rule(_op)


# Chunked cross-entropy on row shards (``h`` and ``labels`` split along dim 0) is exact only
# where no statistic spans rows: ``"sum"`` (loss and ``dW`` are partial sums) and ``"none"``
# (per-row losses). ``"mean"`` divides by the global count of labels: replicated only.


@register_sharding(tg_ops.chunked_linear_cross_entropy.default)
def _chunked_ce(
    h: DTensorSpec,
    w: DTensorSpec,
    labels: DTensorSpec,
    chunk_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    out_dtype: torch.dtype | None = None,
    softcap: float | None = None,
) -> Strategies:
    strategies: Strategies = [([_R], [_R, _R, _R])]
    if reduction == "sum":
        strategies.append(([Partial()], [Shard(0), _R, Shard(0)]))
    elif reduction == "none":
        strategies.append(([Shard(0)], [Shard(0), _R, Shard(0)]))
    return strategies


@register_sharding(tg_ops.chunked_linear_cross_entropy_backward.default)
def _chunked_ce_backward(
    grad: DTensorSpec,
    h: DTensorSpec,
    w: DTensorSpec,
    labels: DTensorSpec,
    chunk_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> Strategies:
    # Outputs (dh, dw), inputs (grad, h, w, labels).
    strategies: Strategies = [([_R, _R], [_R, _R, _R, _R])]
    if reduction == "sum":
        strategies.append(([Shard(0), Partial()], [_R, Shard(0), _R, Shard(0)]))
    elif reduction == "none":
        strategies.append(([Shard(0), Partial()], [Shard(0), Shard(0), _R, Shard(0)]))
    return strategies


def _mm_strategies(scales: Callable[[Placement, Placement], PlacementList]) -> Strategies:
    """``[M, K] @ [K, N]``: replicated, rows sharded, columns sharded, or ``K`` sharded
    (partial sums). ``scales(a, b)`` places the op's further inputs for operands ``a``, ``b``."""
    cases = [(_R, _R, _R), (Shard(0), Shard(0), _R), (Shard(1), _R, Shard(1))]
    cases.append((Partial(), Shard(1), Shard(0)))
    return [([out], [a, b, *scales(a, b)]) for out, a, b in cases]


@register_sharding(aten._int_mm.default)
def _int_mm(a: DTensorSpec, b: DTensorSpec) -> Strategies:
    # int32 partial sums over K add up exactly.
    return _mm_strategies(lambda a, b: [])


@register_sharding(tg_ops.onednn_mm.default)
def _onednn_mm(a: DTensorSpec, b: DTensorSpec, bias: DTensorSpec | None = None) -> Strategies:
    # A float32 mm: sharded like aten.mm (partial sums over K differ only in rounding). A
    # bias [N] follows the output's columns; with partial sums it would be added per rank.
    if bias is None:
        return _mm_strategies(lambda a, b: [])
    strategies = _mm_strategies(lambda a, b: [Shard(0) if b == Shard(1) else _R])
    return [(out, inputs) for out, inputs in strategies if out != [Partial()]]


# DTensor's own ``_scaled_mm`` rule is a single-dim rule, which takes precedence over
# ``register_sharding``; it is removed so that the rule below applies.
DTensor._op_dispatcher.sharding_propagator.op_single_dim_strategy_funcs.pop(
    aten._scaled_mm.default, None
)


@register_sharding(aten._scaled_mm.default)
def _scaled_mm(
    a: DTensorSpec,
    b: DTensorSpec,
    scale_a: DTensorSpec,
    scale_b: DTensorSpec,
    bias: DTensorSpec | None = None,
    scale_result: DTensorSpec | None = None,
    out_dtype: torch.dtype | None = None,
    use_fast_accum: bool = False,
) -> Strategies:
    """Tensorwise (one element) or row-wise (``[M, 1]``, ``[1, N]``) scales: a scale follows
    its operand's non-contraction dim and is replicated otherwise. Other scale layouts and
    a bias run replicated."""
    rowwise = tuple(scale_a.shape) == (a.shape[0], 1) and tuple(scale_b.shape) == (1, b.shape[1])
    tensorwise = math.prod(scale_a.shape) == 1 and math.prod(scale_b.shape) == 1
    if bias is not None or scale_result is not None or not (rowwise or tensorwise):
        extra = [None if t is None else _R for t in (bias, scale_result)]
        return [([_R], [_R, _R, _R, _R, *extra])]

    def scales(pa: Placement, pb: Placement) -> PlacementList:
        scale_a_p = Shard(0) if rowwise and pa == Shard(0) else _R
        scale_b_p = Shard(1) if rowwise and pb == Shard(1) else _R
        return [scale_a_p, scale_b_p, None, None]

    return _mm_strategies(scales)


# --- distributed execution of the quantized linears -------------------------------------


def _run_on_dtensors(implementation: Callable[..., Any]) -> Callable[..., Any]:
    """A DTensor ``__torch_dispatch__`` rule that runs ``implementation`` on the DTensors."""

    def rule(cls: type, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None):
        return implementation(*args, **(kwargs or {}))

    return rule


for _op in (
    float8.float8_linear,
    float8.float8_linear_grad_input,
    float8.float8_linear_grad_weight,
    int8.int8_linear,
    int8.int8_linear_grad_input,
    int8.int8_linear_grad_weight,
    mx.mx_linear,
    mx.mx_linear_grad_input,
    mx.mx_linear_grad_weight,
    bitnet.bitnet_linear,
    bitnet.bitnet_linear_grad_input,
    bitnet.bitnet_linear_grad_weight,
):
    # ``_init_fn`` is the undecorated Python function the custom op was made from.
    _op.register_torch_dispatch(DTensor, _run_on_dtensors(_op._init_fn))


# --- float8 all-gathers ----------------------------------------------------------------------


def _gather_float8(x: DTensor, dtype: torch.dtype) -> DTensor:
    """Sharded ``x`` as a replicated DTensor, all-gathered as tensorwise ``dtype`` bytes:
    ``x`` quantized with the scale of its global amax, gathered, dequantized. A tensorwise
    float8 op re-quantizes the result to the very values it would have made from ``x`` (the
    scale it re-derives differs by float32 rounding, far below float8 resolution)."""
    mesh = x.device_mesh
    replicated = [_R] * mesh.ndim
    if not all(isinstance(p, (Shard, Replicate)) for p in x.placements):
        return x.redistribute(mesh, replicated)  # partial sums must be reduced exactly
    scale = float8.tensorwise_scale(x, dtype).full_tensor()
    local = saturating_cast(x.to_local().float() * scale, dtype)
    # Sent as bytes: gloo has no float8 collectives.
    as_bytes = DTensor.from_local(
        local.view(torch.uint8), mesh, x.placements, shape=x.shape, stride=x.stride()
    )
    gathered = as_bytes.redistribute(mesh, replicated).to_local().view(dtype)
    out = (gathered.float() / scale).to(x.dtype)
    return DTensor.from_local(out, mesh, replicated, run_check=False)


class _GatherFloat8(torch.autograd.Function):
    """Forward: :func:`_gather_float8` in e4m3 (a float8 op's activation). Backward: the
    straight-through estimator the float8 ops use, the gradient redistributed to ``x``'s
    placements (a reduce-scatter of the partial gradient)."""

    @staticmethod
    def forward(ctx: Any, x: DTensor) -> DTensor:
        ctx.placements = x.placements
        return _gather_float8(x, _E4M3)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> DTensor:
        return grad.redistribute(placements=ctx.placements)


class _ScatterFloat8Grad(torch.autograd.Function):
    """Forward: ``y`` redistributed to ``placements`` (a float8 op's partial output,
    reduce-scattered in full precision). Backward: the gradient, which the op quantizes to
    tensorwise e5m2, all-gathered as e5m2 (:func:`_gather_float8`)."""

    @staticmethod
    def forward(ctx: Any, y: DTensor, placements: tuple[Placement, ...]) -> DTensor:
        return y.redistribute(placements=placements)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[DTensor, None]:
        return _gather_float8(grad, _E5M2), None


def gather_float8(x: DTensor) -> DTensor:
    """``x`` all-gathered to replicated as tensorwise e4m3 (its gradient in full precision)."""
    return _GatherFloat8.apply(x)


def scatter_float8_grad(y: DTensor, dim: int) -> DTensor:
    """``y`` redistributed to ``Shard(dim)``; its gradient all-gathered as tensorwise e5m2."""
    return _ScatterFloat8Grad.apply(y, (Shard(dim % y.ndim),))


def _tensorwise_float8(op: Callable[..., Any], config: Sequence[Any]) -> bool:
    return op == tg_ops.float8_linear.default and config[0] == "tensorwise"  # (recipe, kernel)


def gather_cast(
    op: Callable[..., Any], config: Sequence[Any]
) -> Callable[[DTensor], DTensor] | None:
    """How to all-gather the activation input of ``op`` in low precision, or ``None`` where
    that would change the op's numerics.

    ``config`` holds the op's arguments after ``(x, w, bias)``. Only tensorwise
    ``float8_linear`` qualifies (:func:`gather_float8`). The row-wise recipe's ``dW``
    quantizes ``x`` along the tokens, a grid the forward's row scales do not reproduce, so
    it is gathered in full precision.
    """
    return gather_float8 if _tensorwise_float8(op, config) else None


def scatter_cast(
    op: Callable[..., Any], config: Sequence[Any]
) -> Callable[[DTensor, int], DTensor] | None:
    """How to reduce-scatter the partial output of ``op`` so that the all-gather of its
    gradient, in the backward, runs in low precision; ``None`` if it cannot. Tensorwise
    ``float8_linear`` quantizes its output gradient to e5m2 (:func:`scatter_float8_grad`)."""
    return scatter_float8_grad if _tensorwise_float8(op, config) else None


# --- queries -------------------------------------------------------------------------------


Support = Literal["placement rule", "distributed execution"]


def dtensor_support(op: torch._ops.OpOverload) -> Support | None:
    """How ``op`` runs on DTensors: a placement rule, distributed execution of its
    implementation, or ``None`` (DTensor raises "does not have a sharding strategy")."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    if op in propagator.op_strategy_funcs or op in propagator.op_single_dim_strategy_funcs:
        return "placement rule"
    opdef = torch._library.custom_ops.OPDEFS.get(op._schema.name)
    if opdef is not None and DTensor in opdef._torch_dispatch_fns:
        return "distributed execution"
    return None


def torchgraft_ops() -> list[torch._ops.OpOverload]:
    """Every overload registered in the ``torchgraft`` op namespace."""
    ops = []
    for qualname in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, name = qualname.partition("::")
        if namespace == "torchgraft":
            op_name, _, overload = name.partition(".")
            ops.append(getattr(getattr(tg_ops, op_name), overload or "default"))
    return ops
