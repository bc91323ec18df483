"""The training objective of ``torchgraft run``: models as their authors wrote them.

A model trains if its ``forward(tokens, labels)`` returns a scalar loss, or if its
``forward(tokens)`` returns next-token logits ``[batch, seq, vocab]`` — a tensor, or an
object or dict with ``logits`` (a ``transformers`` ``ModelOutput``). For the latter,
:class:`NextTokenLoss` adds the cross-entropy, so that it is part of the captured graph
(loss handlers such as ``chunked_cross_entropy`` see the projection and the loss) while the
graph's parameters keep the model's FQNs and stay the model's own objects.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils._pytree import tree_leaves

from torchgraft.ir.errors import TorchgraftError

SUPPORTED = (
    "torchgraft run trains causal language models on byte tokens: forward(tokens) returning "
    "logits [batch, seq, vocab >= 256] (a tensor, or an object or dict with 'logits'), or "
    "forward(tokens, labels) returning a scalar loss, with model.inputs one int64 "
    "[batch, seq] tensor per argument (check, viz and explain take any model)"
)
"""What ``torchgraft run`` can train, said in one line by every refusal."""

BYTE_VOCAB = 256
"""The training text is read one token per byte."""


class UnsupportedModelError(TorchgraftError):
    """``torchgraft run`` cannot train this model; the message says what it supports."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}. {SUPPORTED}")


def takes_labels(model: nn.Module) -> bool:
    """Whether ``model.forward`` requires two positional arguments (``tokens, labels``).

    A forward whose arguments beyond the first have defaults (``transformers`` models:
    ``labels=None``) is called with the tokens alone."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: call it with tokens
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


def logits_of(output: Any) -> torch.Tensor:
    """The logits in what a forward returned: the tensor itself, ``output.logits`` or
    ``output["logits"]``; :class:`UnsupportedModelError` otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise UnsupportedModelError(
        f"forward(tokens) returned {type(output).__name__}, which is neither a tensor nor has "
        "'logits'"
    )


class NextTokenLoss(nn.Module):
    """``forward(tokens, labels)``: mean cross-entropy of ``model(tokens)``'s logits against
    ``labels`` (already shifted by the data pipeline: ``labels[:, t]`` is the token after
    ``tokens[:, t]``).

    The wrapper shares the model's module tree instead of holding the model as a child, so
    ``named_parameters()`` gives exactly the model's FQNs (``lm_head.weight``, not
    ``model.lm_head.weight``) and the model's own ``Parameter`` objects; the model itself is
    called as it is, hooks included. ``use_cache=False`` is passed when the forward takes it
    (``transformers`` causal LMs would otherwise return a cache).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for state in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[state] = model.__dict__[state]
        self.__dict__["_lm"] = model  # not registered: its state already is
        self.__dict__["_lm_kwargs"] = {"use_cache": False} if _accepts(model, "use_cache") else {}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self._lm(tokens, **self._lm_kwargs))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def check_language_model(model: nn.Module, tokens: torch.Tensor) -> None:
    """Refuse (:class:`UnsupportedModelError`) a logits model that next-token training would
    get wrong: logits not ``[batch, seq, vocab >= 256]``, or not causal — changing the last
    token changes the logits before it (a bidirectional encoder such as BERT would learn to
    copy its input). Runs the model twice on one row, without gradients, with the same
    random state (dropout), and restores its buffers."""
    row = tokens[:1]
    changed = row.clone()
    changed[0, -1] = 1 if int(row[0, -1]) == 0 else 0  # a valid id in any vocabulary
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            outputs = []
            for ids in (row, changed):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    try:
                        output = model(ids, **kwargs)
                    except Exception as exc:  # the user's model on one row of its inputs
                        raise UnsupportedModelError(
                            f"forward(tokens [1, {row.shape[1]}]) raised "
                            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                        ) from exc
                    outputs.append(logits_of(output).float())
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    logits, other = outputs
    seq = row.shape[1]
    if logits.dim() != 3 or logits.shape[:2] != (1, seq) or logits.shape[2] < BYTE_VOCAB:
        raise UnsupportedModelError(
            f"forward(tokens [1, {seq}]) returned logits of shape {list(logits.shape)}"
        )
    if seq > 1:
        before, after = logits[0, :-1], other[0, :-1]
        scale = before.abs().max().clamp_min(1e-30)
        if not torch.allclose(before, after, rtol=0.0, atol=1e-4 * float(scale)):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not causal: changing the last of {seq} tokens "
                "changes the logits of the tokens before it, so next-token training would let "
                "it see the answer"
            )


def check_scalar_loss(gm: fx.GraphModule) -> None:
    """Refuse a captured ``forward(tokens, labels)`` whose output is not one scalar."""
    (output,) = gm.graph.find_nodes(op="output")
    values = [n.meta.get("val") if isinstance(n, fx.Node) else n for n in tree_leaves(output.args)]
    if len(values) == 1 and isinstance(values[0], torch.Tensor) and values[0].numel() == 1:
        return
    shapes = [
        [optimization_hint(d) for d in v.shape] if isinstance(v, torch.Tensor) else type(v).__name__
        for v in values
    ]  # a symbolic batch dim shown as the example's size
    raise UnsupportedModelError(
        f"forward(tokens, labels) returned {shapes[0] if len(shapes) == 1 else shapes}, not a "
        "scalar loss (give model.inputs one tensor if forward(tokens) returns logits)"
    )


def as_trained(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """What ``torchgraft run`` captures and trains, with the inputs to capture it with:
    for ``(tokens, labels)`` the model itself (its forward computes the loss); for
    ``(tokens,)`` a causal LM's :class:`NextTokenLoss` with labels shaped like the tokens.
    Raises :class:`UnsupportedModelError` for anything else."""
    if not 1 <= len(inputs) <= 2 or any(
        t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 2 for t in inputs
    ):
        shown = ", ".join(f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for t in inputs)
        raise UnsupportedModelError(f"model.inputs are {shown or 'empty'}")
    if len(inputs) == 2:
        return model, inputs
    check_language_model(model, inputs[0])
    return NextTokenLoss(model), (inputs[0], inputs[0].clone())
