"""What the low-precision linear handlers (float8, int8, MX, BitNet) share.

:class:`LinearHandler` declares one rule per form in which models write a linear layer,
each replaced by the subclass's :meth:`~LinearHandler.quantized_linear` (one custom op call
on ``x [..., K]``, ``w [N, K]``, ``b``):

* ``aten.linear(x, w[, b])``: ``nn.Linear`` / ``F.linear``, weight ``[out, in]``;
* ``aten.addmm(b, x, w)`` / ``aten.mm(x, w)`` with a parameter ``w [in, out]``
  (``transformers``' GPT-2 ``Conv1D``: ``addmm(bias, x.view(-1, K), weight)``), and the
  same with ``aten.t(w)`` of a ``[out, in]`` parameter (a decomposed ``F.linear``);
* ``aten.matmul(x, w)`` with a parameter ``w [in, out]`` (``x @ self.w``) or its transpose
  ``[out, in]`` (``x @ self.w.T``, ``x @ self.w.t()``).

The ``[in, out]`` forms pass ``aten.t(w)`` to the op, so gradients reach the original
parameter through the transpose. A form that multiplies two activations (attention scores)
is not a linear layer and does not match (the ``where`` filter :func:`parameter_weight`).

Three options and the shape eligibility are applied in :meth:`~LinearHandler.reject`, so
that ``tg.explain`` states why a linear was left alone and
:meth:`~torchgraft.Handler.skipped` lists it with that reason: ``skip_head`` (default on)
leaves the projection that produces the logits in high precision, found by structure
(:func:`produces_logits`), whatever its name; ``skip_router`` (default on) does the same
for a mixture-of-experts router (:func:`routes_experts`); ``skip_fqns`` names modules
explicitly. A subclass only writes its options, its shape requirement and its op::

    @tg.register_handler("mx")
    class MX(LinearHandler):
        @dataclasses.dataclass(kw_only=True)
        class Options(LinearHandler.Options):
            format: Literal["mxfp8", "mxfp4"] = "mxfp8"
            '''Element format.'''

        def shape_failure(self, w):
            return None if w.shape[1] % 32 == 0 else f"K={w.shape[1]} ..."

        def quantized_linear(self, x, w, b):
            return torch.ops.torchgraft.mx_linear.default(x, w, b, self.options.format)

Because the float8, int8, MX and BitNet handlers share these rules, any two of them in one
plan match the same nodes, which the pass manager's ``overlap`` check reports, unless their
``skip_fqns`` make them claim disjoint modules.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

import torchgraft.ops  # noqa: F401  (registers the torchgraft::*_linear ops)
from torchgraft.handlers.base import Handler, ModuleFilter
from torchgraft.ir.choices import chooses_by_index
from torchgraft.ir.provenance import module_glob
from torchgraft.ir.rule import Match, rule

__all__ = ["LinearHandler", "parameter_weight", "produces_logits", "routes_experts"]

aten = torch.ops.aten

_RESHAPES = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.transpose.int,
        aten.permute.default,
        aten.t.default,
        aten.contiguous.default,
        aten.clone.default,
        aten.alias.default,
        aten.to.dtype,
        aten.to.dtype_layout,
        aten._to_copy.default,
        aten.tanh.default,  # logit soft-capping: cap * tanh(logits / cap)
    }
)
"""Ops that keep a value "the logits": reshapes, casts and soft-capping."""

_BY_CONSTANT = frozenset({aten.div.Tensor, aten.mul.Tensor, aten.div.Scalar, aten.mul.Scalar})
"""Ops that keep the logits when the other operand is a Python number (a temperature, a cap)."""

_LOSSES = frozenset(
    {
        aten.cross_entropy_loss.default,
        aten.nll_loss.default,
        aten.nll_loss_forward.default,
        aten.log_softmax.int,
        aten._log_softmax.default,
        aten.binary_cross_entropy_with_logits.default,
        aten.mse_loss.default,
    }
)
"""Losses whose input is the model's prediction."""


def _keeps_logits(node: fx.Node, value: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _RESHAPES:
        return node.args[0] is value
    if node.target in _BY_CONSTANT:
        return node.args[0] is value and not isinstance(node.args[1], fx.Node)
    return False


def produces_logits(node: fx.Node) -> bool:
    """Whether ``node`` computes the model's prediction: through reshapes, casts and
    soft-capping only (:data:`_RESHAPES`), it is returned by the graph or fed to a loss.

    This is how the linear handlers find the LM head (or a classifier) whatever its FQN:
    ``lm_head``, ``output``, GPT-2's tied ``lm_head`` and BERT's ``cls.predictions.decoder``
    produce logits; an attention or FFN projection is followed by other computation.
    """
    return _reaches(node, _is_prediction_sink, _keeps_logits)


_SCORE_PATH = (_RESHAPES - {aten.tanh.default}) | {
    aten.softmax.int,
    aten._softmax.default,
}
"""Reshapes, casts and softmax: ops that keep a mixture-of-experts router's logits its
scores when they read them as their input; so does any pointwise op (sigmoid, masking,
added noise), whichever operand the scores are (:func:`_keeps_scores`)."""

ROUTER_REACH = 4
"""How many such ops at most lie between a router and the choice of experts (Mixtral:
view, softmax, cast; PhiMoE's sampling sparse mixer: masked_fill, sub): a bound keeps the
search near the linear, as the residual stream is pointwise from layer to layer."""


def routes_experts(node: fx.Node) -> bool:
    """Whether ``node`` computes a mixture-of-experts router's logits: within
    :data:`ROUTER_REACH` reshapes, casts, softmax and pointwise ops (sigmoid, masking, noisy
    top-k gating's noise), it reaches a choice op whose indices pick each token's experts
    (:func:`~torchgraft.ir.choices.chooses_by_index`: ``topk`` in transformers' Mixtral,
    Qwen2-MoE ``mlp.gate`` and TorchTitan's ``router.gate``, ``max`` along a dim in PhiMoE's
    sparse mixer, ``argmax`` in Switch Transformers), whatever its FQN. Rounding there
    changes which experts a token goes to, not only by how much, so low-precision recipes
    keep the router in high precision."""
    return _reaches(node, chooses_by_index, _keeps_scores, ROUTER_REACH)


def _reaches(
    node: fx.Node,
    is_sink: Callable[[fx.Node], bool],
    keeps: Callable[[fx.Node, fx.Node], bool],
    within: int | None = None,
) -> bool:
    """Whether a user of ``node`` for which ``is_sink`` holds is reached through users that
    ``keeps`` (the user, the value it reads) the same quantity, ``within`` such users at
    most (None: any number). A region exported as a higher-order op (a ``torch.no_grad()``
    or autocast block) is followed into: its body reads the value as a placeholder."""
    work, seen = collections.deque([(node, 0)]), {node}
    while work:
        value, steps = work.popleft()
        for user, read in _users_into_bodies(value, node.graph):
            if is_sink(user):
                return True
            if user in seen or (within is not None and steps >= within):
                continue
            if keeps(user, read):
                seen.add(user)
                work.append((user, steps + 1))
    return False


def _users_into_bodies(value: fx.Node, top: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(user, the value it reads)`` for the users of ``value``; a higher-order op's call is
    replaced by the users of the body placeholders it passes ``value`` to (a body's output
    is not followed out: it is not ``top``'s)."""
    found = []
    for user in value.users:
        placeholders = _body_placeholders(user, value)
        if placeholders:
            found += [pair for p in placeholders for pair in _users_into_bodies(p, top)]
        elif not (user.op == "output" and user.graph is not top):
            found.append((user, value))
    return found


def _body_placeholders(call: fx.Node, value: fx.Node) -> list[fx.Node]:
    """The placeholders of the graph body that higher-order op ``call`` passes ``value`` to:
    export writes ``wrap_with_set_grad_enabled(enabled, body, *operands)`` and
    ``wrap_with_autocast(..., body, *operands)``, the operands after the body's
    ``get_attr``."""
    root = call.graph.owning_module
    if call.op != "call_function" or root is None:
        return []
    for i, arg in enumerate(call.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = _attribute(root, arg.target)
            if isinstance(body, fx.GraphModule):
                inputs = body.graph.find_nodes(op="placeholder")
                return [p for p, a in zip(inputs, call.args[i + 1 :]) if a is value]
    return []


def _attribute(root: nn.Module, target: str) -> Any:
    try:
        return operator.attrgetter(target)(root)
    except AttributeError:
        return None


def _is_prediction_sink(node: fx.Node) -> bool:
    return node.op == "output" or (node.op == "call_function" and node.target in _LOSSES)


def _keeps_scores(node: fx.Node, value: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _SCORE_PATH:
        return node.args[0] is value
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


def parameter_weight(match: Match) -> bool:
    """``where`` filter of the matmul-style forms: ``w`` is an ``nn.Parameter`` (a layer's
    weight, not an activation) and ``x`` has at least 2 dims. A parameter that is not 2-D
    (stacked expert weights) is a layer the handler skips, with the reason."""
    w = match.node("w")
    root = w.graph.owning_module
    if w.op != "get_attr" or root is None:
        return False
    value = _attribute(root, w.target)
    x = match["x"]
    return isinstance(value, nn.Parameter) and getattr(x, "ndim", 0) >= 2


_IN_OUT = frozenset({"addmm", "mm", "matmul"})
"""Rules whose weight parameter is stored ``[in, out]`` (the op receives its transpose)."""


class LinearHandler(Handler):
    """Base of the handlers that rewrite linear layers into one low-precision custom op.

    Subclasses override :meth:`quantized_linear` and, when the format constrains shapes,
    :meth:`shape_failure`; they are registered, this base is not.
    """

    @dataclasses.dataclass(kw_only=True)
    class Options:
        skip_fqns: list[str] = dataclasses.field(default_factory=list)
        """Module FQN globs to leave in high precision. A glob matches a dotted sub-path of
        the FQN (see :func:`torchgraft.ir.provenance.module_glob`): ``"attention"`` skips
        every linear inside an ``attention`` module, ``"lm_head"`` the module ``lm_head``
        or ``model.lm_head``. A glob that matches no module of the graph is reported by
        ``check`` (``unmatched_filter``)."""
        skip_head: bool = True
        """Leave the projection that produces the logits in high precision, as low-precision
        training recipes do: the linear whose output, through reshapes, casts and
        soft-capping only, is returned by the model or fed to its loss (``lm_head``,
        ``output``, a classifier), whatever its name."""
        skip_router: bool = True
        """Leave a mixture-of-experts router in high precision: the linear whose output,
        within a few reshapes, casts, softmax and pointwise ops, reaches the ``topk`` (or
        ``max`` along a dim, ``argmax``) that picks the experts (:func:`routes_experts`),
        whatever its name."""

    @rule
    def linear(x: torch.Tensor, w: torch.Tensor):  # linear(x, w) -> <fmt>_linear(x, w, None)
        return aten.linear.default(x, w)

    @linear.replacement
    def _(self, x, w):
        return self.quantized_linear(x, w, None)

    @rule
    def linear_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):  # -> <fmt>_linear(x, w, b)
        return aten.linear.default(x, w, b)

    @linear_bias.replacement
    def _(self, x, w, b):
        return self.quantized_linear(x, w, b)

    @rule(where=parameter_weight)
    def addmm(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor):  # Conv1D: w [in, out]
        return aten.addmm.default(b, x, w)

    @addmm.replacement
    def _(self, b, x, w):
        return self.quantized_linear(x, aten.t.default(w), b)

    @rule(where=parameter_weight)
    def addmm_t(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor):  # decomposed F.linear
        return aten.addmm.default(b, x, aten.t.default(w))

    @addmm_t.replacement
    def _(self, b, x, w):
        return self.quantized_linear(x, w, b)

    @rule(where=parameter_weight)
    def mm(x: torch.Tensor, w: torch.Tensor):  # x2d @ w, w [in, out]
        return aten.mm.default(x, w)

    @mm.replacement
    def _(self, x, w):
        return self.quantized_linear(x, aten.t.default(w), None)

    @rule(where=parameter_weight)
    def mm_t(x: torch.Tensor, w: torch.Tensor):  # x2d @ w.t(), w [out, in]
        return aten.mm.default(x, aten.t.default(w))

    @mm_t.replacement
    def _(self, x, w):
        return self.quantized_linear(x, w, None)

    @rule(where=parameter_weight)
    def matmul(x: torch.Tensor, w: torch.Tensor):  # x @ self.w, w [in, out]
        return aten.matmul.default(x, w)

    @matmul.replacement
    def _(self, x, w):
        return self.quantized_linear(x, aten.t.default(w), None)

    @rule(where=parameter_weight)
    def matmul_t(x: torch.Tensor, w: torch.Tensor):  # x @ self.w.t(), w [out, in]
        return aten.matmul.default(x, aten.t.default(w))

    @matmul_t.replacement
    def _(self, x, w):
        return self.quantized_linear(x, w, None)

    @rule(where=parameter_weight)
    def matmul_T(x: torch.Tensor, w: torch.Tensor):  # x @ self.w.T, w [out, in]
        return aten.matmul.default(x, aten.numpy_T.default(w))

    @matmul_T.replacement
    def _(self, x, w):
        return self.quantized_linear(x, w, None)

    def quantized_linear(self, x: Any, w: Any, b: Any | None) -> Any:
        """The replacement of ``F.linear(x, w, b)``: one custom op call on the traced values
        (``w`` is ``[out, in]``; ``b`` is None for the bias-free forms)."""
        raise NotImplementedError(f"{type(self).__name__} must define quantized_linear(x, w, b)")

    def shape_failure(self, w: torch.Tensor) -> str | None:
        """Why the format cannot take weight ``w`` (a fake tensor ``[N, K]``), or None.
        Default: every shape is supported."""
        return None

    def module_filters(self) -> list[ModuleFilter]:
        """The rules' globs and ``skip_fqns`` (checked by ``unmatched_filter``)."""
        skip = ModuleFilter("skip_fqns", tuple(self.options.skip_fqns), True)
        return [*super().module_filters(), *([skip] if skip.globs else [])]

    def reject(self, match: Match) -> str | None:
        """Skip modules matched by ``skip_fqns``, the projection producing the logits
        (``skip_head``), then weights :meth:`shape_failure` refuses (listed with their
        reasons by :meth:`~torchgraft.Handler.skipped`)."""
        glob = module_glob(match.module_fqn, self.options.skip_fqns)
        if glob is not None:
            return f"module '{match.module_fqn}' is in skip_fqns (glob {glob!r})"
        if self.options.skip_head and produces_logits(match.anchor):
            return (
                f"{_described(match)} produces the logits (the head stays in high precision; "
                "set skip_head: false to convert it)"
            )
        if self.options.skip_router and routes_experts(match.anchor):
            return (
                f"{_described(match)} routes tokens to experts (its scores reach a choice op, "
                "topk / max / argmax: the router stays in high precision; set skip_router: "
                "false to convert it)"
            )
        w = match["w"]
        if w.ndim != 2:
            return f"weight is {w.ndim}-D, expected [N, K]"
        if match.rule.name in _IN_OUT:
            w = w.mT  # stored [in, out]: the op gets [N, K]
        return self.shape_failure(w)


def _described(match: Match) -> str:
    """The matched layer as a message names it: its module, else its node."""
    return f"module '{match.module_fqn}'" if match.module_fqn else f"node '{match.anchor.name}'"
