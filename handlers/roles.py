"""What a parameter is for, found by structure: the ``embedding`` table and the ``head``.

Handlers that treat the embeddings and the output projection differently (``muon`` leaves
them to AdamW, as Muon's authors do) ask :func:`parameter_roles` instead of matching names,
so that ``tok_embeddings`` / ``wte`` / ``embed_tokens`` and ``output`` / ``lm_head`` /
``cls.predictions.decoder`` are all found:

* on a captured graph (a graph module, or a module wrapping one: compiled, joint step),
  ``embedding`` is the table of an ``aten.embedding`` and ``head`` the weight of the linear
  whose output is the model's prediction (:func:`~torchgraft.handlers.linear_rules.produces_logits`,
  what ``skip_head`` uses);
* on an eager module (no graph: e.g. the FSDP2 model of a training framework),
  ``embedding`` is the weight of an ``nn.Embedding`` and ``head`` that of an ``nn.Linear``
  whose weight is tied to an embedding, or that maps the embedding's width onto its
  vocabulary (``in_features == embedding_dim`` and ``out_features == num_embeddings``).
  Without a graph this is a shape test: a hidden layer of exactly that shape would be
  taken for a head too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from torchgraft.handlers.linear_rules import produces_logits

__all__ = ["ROLES", "parameter_roles"]

aten = torch.ops.aten

ROLES = ("embedding", "head")
"""The roles :func:`parameter_roles` finds."""

_WEIGHT_ARG = {
    aten.linear.default: 1,
    aten.mm.default: 1,
    aten.matmul.default: 1,
    aten.addmm.default: 2,
}
"""Linear forms and the argument that holds the weight (maybe transposed)."""
_TRANSPOSES = frozenset({aten.t.default, aten.permute.default, aten.transpose.int})


def parameter_roles(model: nn.Module) -> dict[str, frozenset[str]]:
    """Parameter FQN → its roles (of :data:`ROLES`), for the parameters that have one."""
    graph_module = _graph_module(model)
    if graph_module is not None:
        return _graph_roles(graph_module)
    return _module_roles(model)


def _graph_module(model: nn.Module) -> fx.GraphModule | None:
    """The graph module ``model`` is or runs (``torch.compile``'s ``_orig_mod``, the joint
    step's flat graph), with the same parameter FQNs; None for an eager module."""
    for candidate in (model, getattr(model, "_orig_mod", None), model.__dict__.get("_flat")):
        if isinstance(candidate, fx.GraphModule) and any(
            n.op == "get_attr" for n in candidate.graph.nodes
        ):
            return candidate
    return None


def _parameter_of(value: object) -> str | None:
    """The FQN of the parameter ``value`` reads, through transposes; None otherwise."""
    while (
        isinstance(value, fx.Node) and value.op == "call_function" and value.target in _TRANSPOSES
    ):
        value = value.args[0]
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


def _graph_roles(gm: fx.GraphModule) -> dict[str, frozenset[str]]:
    roles: dict[str, set[str]] = {}
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.embedding.default:
            fqn, role = _parameter_of(node.args[0]), "embedding"
        elif node.target in _WEIGHT_ARG and produces_logits(node):
            fqn, role = _parameter_of(node.args[_WEIGHT_ARG[node.target]]), "head"
        else:
            continue
        if fqn in params:
            roles.setdefault(fqn, set()).add(role)
    return _frozen(roles)


def _module_roles(model: nn.Module) -> dict[str, frozenset[str]]:
    roles: dict[str, set[str]] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for table in embeddings:
        roles.setdefault(names[id(table.weight)], set()).add("embedding")
    projections = {(table.embedding_dim, table.num_embeddings) for table in embeddings}
    tables = {id(table.weight) for table in embeddings}
    for module in model.modules():
        if isinstance(module, nn.Linear) and (
            id(module.weight) in tables or (module.in_features, module.out_features) in projections
        ):
            roles.setdefault(names[id(module.weight)], set()).add("head")
    return _frozen(roles)


def _frozen(roles: Mapping[str, set[str]]) -> dict[str, frozenset[str]]:
    return {fqn: frozenset(found) for fqn, found in roles.items()}
