"""Tensor parallelism on a captured graph: parameters become DTensors by module FQN, and
explicit redistributions go where the plan's layouts meet.

``torch.distributed.tensor.parallel.parallelize_module`` refuses exported graphs (their
submodules are not ``nn.Linear``), so the plan is applied here, on the graph itself:

* every parameter is distributed by the style of the module that owns it: ``colwise``
  shards a weight on its output features (and the bias), ``rowwise`` on its input features
  (bias replicated), everything else is replicated. Which dim holds the output features is
  read from the ops that consume the weight (:mod:`~torchgraft.passes.weight_layout`):
  dim 0 for ``nn.Linear``'s ``[out, in]``, dim 1 for ``[in, out]`` (GPT-2's ``Conv1D`` as
  ``aten.addmm``, ``x @ self.w``); a weight no matmul consumes is taken as ``[out, in]``.
  Buffers and tensor constants become replicated DTensors.
* a module's nodes are the graph nodes traced in it (``nn_module_stack``, which rewritten
  nodes inherit). Where a value enters a ``colwise`` module it is redistributed to
  ``Replicate`` (an all-gather under sequence parallelism, nothing otherwise); where it
  enters a ``rowwise`` module, to ``Shard(-1)``; where a ``rowwise`` module's output leaves
  it, the partial sum is all-reduced to ``Replicate``, or reduce-scattered to the token dim
  (``Shard(ndim - 2)``) under sequence parallelism.

Everything between those points is ordinary DTensor propagation: baked-in shapes such as
``view(q, [B, L, n_heads, head_dim])`` are global shapes, which DTensor maps onto the
shards (the head dim ends up sharded). Ops follow their DTensor rules, torchgraft's custom
ops included (:mod:`torchgraft.ops.sharding`), so nothing here depends on which handler
rewrote what. Where a gather feeds only ops that can take their input in low precision
(tensorwise ``float8_linear``), the activation is gathered as float8, and the gradient of
such an op's reduce-scattered output is gathered as float8 in the backward
(:func:`torchgraft.ops.sharding.gather_cast`, :func:`~torchgraft.ops.sharding.scatter_cast`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, get_args

import torch
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.provenance import module_fqn, module_glob
from torchgraft.ops.sharding import gather_cast, scatter_cast
from torchgraft.passes.graph_io import is_number
from torchgraft.passes.weight_layout import output_feature_dims

__all__ = [
    "LLAMA_PLAN",
    "Style",
    "TensorParallelError",
    "apply_tensor_parallel",
    "module_styles",
    "redistribute",
]

Style = Literal["colwise", "rowwise", "replicate"]

LLAMA_PLAN: dict[str, Style] = {
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "colwise",
}
"""The Megatron plan of :func:`torchgraft.models.build_llama`: attention and SwiGLU as
column-then-row pairs, vocabulary-sharded output; norms and embeddings replicated."""


class TensorParallelError(TorchgraftError):
    """A tensor-parallel plan cannot be applied to a graph."""


def module_styles(gm: fx.GraphModule, plan: Mapping[str, Style]) -> dict[str, Style]:
    """The style of every module that owns parameters, from the first glob of ``plan``
    matching a dotted sub-path of its FQN (``"output"`` matches ``model.output``).

    Raises :class:`TensorParallelError` for an unknown style or a glob that matches no
    module (a plan that silently does nothing is the bug this prevents).
    """
    for glob, style in plan.items():
        if style not in get_args(Style):
            raise TensorParallelError(
                f"tensor-parallel plan: {glob!r} has style {style!r}; use one of {get_args(Style)}"
            )
    owners = sorted({fqn.rpartition(".")[0] for fqn, _ in gm.named_parameters()})
    styles: dict[str, Style] = {}
    used: set[str] = set()
    for owner in owners:
        glob = module_glob(owner, list(plan))
        if glob is not None:
            styles[owner] = plan[glob]
            used.add(glob)
    unused = [g for g in plan if g not in used]
    if unused:
        raise TensorParallelError(
            f"tensor-parallel plan: {unused} match no module with parameters "
            f"(modules look like {owners[:4]})"
        )
    return styles


def _placement(style: Style | None, ndim: int, output_dim: int) -> Placement:
    """Where a parameter of a ``style`` module goes; ``output_dim``: the dim of a 2-D
    weight that holds the output features."""
    if style == "colwise":
        return Shard(output_dim if ndim == 2 else 0)
    if style == "rowwise" and ndim == 2:
        return Shard(1 - output_dim)
    return Replicate()


def _distribute_parameters(
    gm: fx.GraphModule, mesh: DeviceMesh, styles: Mapping[str, Style]
) -> None:
    """Replace every parameter by its DTensor, at each FQN it has: a tied parameter
    (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) stays one object, placed by
    the style of the first module that owns it."""
    output_dims = output_feature_dims(gm)
    aliases: dict[int, list[str]] = {}
    for fqn, param in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(fqn)
    for fqns in aliases.values():
        param = gm.get_parameter(fqns[0])
        output_dim = next((output_dims[f] for f in fqns if f in output_dims), 0)
        placement = _placement(styles.get(fqns[0].rpartition(".")[0]), param.ndim, output_dim)
        if isinstance(placement, Shard) and param.shape[placement.dim] % mesh.size() != 0:
            raise TensorParallelError(
                f"{fqns[0]} {tuple(param.shape)}: dim {placement.dim} is not divisible by the "
                f"tensor-parallel degree {mesh.size()}"
            )
        sharded = distribute_tensor(param.detach(), mesh, [placement])
        new = nn.Parameter(sharded, requires_grad=param.requires_grad)
        for fqn in fqns:
            owner_fqn, _, name = fqn.rpartition(".")
            gm.get_submodule(owner_fqn).register_parameter(name, new)


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove ``aten._assert_tensor_metadata`` nodes (export's check of a ``.to(dtype)``
    input's dtype and device, e.g. in GPT-2): DTensor has no rule for them, and they
    check what sharding does not change."""
    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten._assert_tensor_metadata.default
    ):
        gm.graph.erase_node(node)


def _replicate_constants(gm: fx.GraphModule, mesh: DeviceMesh) -> None:
    """Buffers and other tensors the graph reads with ``get_attr`` become replicated."""
    for node in gm.graph.find_nodes(op="get_attr"):
        owner_fqn, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_fqn)
        value = getattr(owner, name)
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            replicated = distribute_tensor(value, mesh, [Replicate()])
            if name in owner._buffers:
                owner._buffers[name] = replicated
            else:
                setattr(owner, name, replicated)


def redistribute(x: DTensor, layout: str) -> DTensor:
    """``x`` redistributed to ``layout``: ``"replicate"`` or ``"shard(d)"`` on its mesh.

    The graph calls this at the points the plan fixes (see the module docstring)."""
    placement = Replicate() if layout == "replicate" else Shard(_shard_dim(layout) % x.ndim)
    return x.redistribute(placements=[placement])


def _shard_dim(layout: str) -> int:
    """``d`` of the layout ``"shard(d)"``."""
    return int(layout[len("shard(") : -1])


def _owners(gm: fx.GraphModule, styles: Mapping[str, Style]) -> dict[fx.Node, str]:
    """Each node traced inside a styled module, mapped to the innermost such module."""
    owners: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        parts = module_fqn(node).split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in styles:
                owners[node] = candidate
                break
    return owners


def _boundary_edges(
    gm: fx.GraphModule, styles: Mapping[str, Style], sequence_parallel: bool
) -> Iterator[tuple[fx.Node, fx.Node, str]]:
    """``(producer, consumer, layout)`` for every value crossing a styled module's border."""
    owners = _owners(gm, styles)
    for node, owner in owners.items():
        style = styles[owner]
        entry = {"colwise": "replicate", "rowwise": "shard(-1)"}.get(style)
        if entry is not None:
            for producer in node.all_input_nodes:
                if (
                    producer.op != "get_attr"
                    and owners.get(producer) != owner
                    and not is_number(producer)
                ):
                    yield producer, node, entry
        if style == "rowwise" and not is_number(node):
            ndim = node.meta["val"].ndim
            exit_layout = f"shard({ndim - 2})" if sequence_parallel else "replicate"
            for user in node.users:
                if owners.get(user) != owner:
                    yield node, user, exit_layout


def _insert_redistributions(
    gm: fx.GraphModule, styles: Mapping[str, Style], sequence_parallel: bool
) -> None:
    """One call per value and layout, shared by all the consumers that need that layout."""
    groups: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    for producer, consumer, layout in _boundary_edges(gm, styles, sequence_parallel):
        groups.setdefault((producer, layout), []).append(consumer)
    for (producer, layout), consumers in groups.items():
        target, args = _redistribution(producer, layout, consumers, sequence_parallel)
        # A gather belongs to the block of its consumers, a reduction to its producer's.
        anchor = consumers[0] if layout == "replicate" else producer
        with gm.graph.inserting_after(producer):
            new = gm.graph.call_function(target, (producer, *args))
        new.meta.update(
            val=producer.meta.get("val"), nn_module_stack=anchor.meta.get("nn_module_stack", {})
        )
        for consumer in consumers:
            consumer.replace_input_with(producer, new)


def _redistribution(
    producer: fx.Node, layout: str, consumers: list[fx.Node], sequence_parallel: bool
) -> tuple[Callable[..., DTensor], tuple[Any, ...]]:
    """The call that redistributes ``producer`` to ``layout`` for ``consumers``.

    Under sequence parallelism, an all-gather runs in float8 when every consumer takes
    ``producer`` as its activation and casts it identically (``gather_cast``), and a
    reduce-scatter gathers its gradient in float8 when its producer allows it
    (``scatter_cast``); everything else is :func:`redistribute`.
    """
    if sequence_parallel and layout == "replicate":
        casts = {
            gather_cast(c.target, c.args[3:]) if c.args and c.args[0] is producer else None
            for c in consumers
        }
        if len(casts) == 1 and None not in casts:
            return casts.pop(), ()
    # Only when these consumers are the producer's sole users: the op's backward then
    # quantizes exactly the gradient that was gathered.
    if sequence_parallel and layout.startswith("shard") and set(producer.users) == set(consumers):
        cast = scatter_cast(producer.target, producer.args[3:])
        if cast is not None:
            return cast, (_shard_dim(layout),)
    return redistribute, (layout,)


def apply_tensor_parallel(
    gm: fx.GraphModule,
    mesh: DeviceMesh,
    plan: Mapping[str, Style],
    *,
    sequence_parallel: bool = True,
) -> dict[str, Style]:
    """Shard ``gm``'s parameters over the 1-D ``mesh`` by ``plan`` and insert the
    redistributions (see the module docstring); returns the style of each planned module.

    The graph's inputs must then be replicated DTensors on ``mesh`` and its outputs are
    DTensors (:mod:`torchgraft.passes.graph_io` converts both).
    """
    if mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism needs a 1-D mesh, got {mesh}")
    styles = module_styles(gm, plan)
    _drop_metadata_asserts(gm)
    _distribute_parameters(gm, mesh, styles)
    _replicate_constants(gm, mesh)
    _insert_redistributions(gm, styles, sequence_parallel)
    gm.graph.lint()
    gm.recompile()
    return styles
