"""New state created by replacements: parameters, buffers and tensor constants.

Inside a replacement, :func:`new_parameter`, :func:`new_buffer` and :func:`new_constant`
return a value the replacement computes with like any other; each match gets its own
tensor, registered on the graph module under the FQN of the module the match came from
(``layers.0.attention.wq`` + ``lora_a`` → ``layers.0.attention.wq.lora_a``, a suffix
``_1``, ``_2`` ... where the name is taken). Parameters are in ``gm.parameters()`` (so the
optimizer trains them) and, like buffers, in ``gm.state_dict()``; constants are plain
tensor attributes, not saved. :func:`value_of` reads the real tensor behind a bound
parameter, buffer or constant (to fold a weight). A replacement that creates state or reads
values is traced again for every match (no template cache): its tensors are per match.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import fx, nn

from torchgraft.ir.errors import RuleDefinitionError

Kind = Literal["parameter", "buffer", "constant"]

NEW_ATTRIBUTE = "torchgraft_new_attribute"
"""``meta`` key of a template ``get_attr`` node that asks for new state (a :class:`NewAttribute`)."""
BOUND_NODE = "torchgraft_bound_node"
"""``meta`` key of a template placeholder: the graph node it stands for (for :func:`value_of`)."""

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("torchgraft_replacement_tracer")


@dataclasses.dataclass
class NewAttribute:
    """A tensor a replacement asks to register on the graph module."""

    name: str
    kind: Kind
    value: torch.Tensor
    persistent: bool = True
    module: str | None = None
    """FQN of the module to register it on; None: the module the match came from."""


def active_tracer() -> Any:
    """The replacement tracer running now; raises outside a replacement."""
    tracer = _ACTIVE.get(None)
    if tracer is None:
        raise RuleDefinitionError(
            "new_parameter / new_buffer / new_constant / value_of are only valid inside a "
            "rule's replacement while it is traced"
        )
    return tracer


@contextlib.contextmanager
def tracing(tracer: Any) -> Iterator[None]:
    """Make ``tracer`` the active replacement tracer while the block runs."""
    token = _ACTIVE.set(tracer)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _bound_attribute(value: Any, what: str) -> fx.Node:
    """The graph ``get_attr`` node a replacement argument stands for."""
    node = value.node if isinstance(value, fx.Proxy) else None
    bound = node.meta.get(BOUND_NODE) if node is not None else None
    if bound is None or bound.op != "get_attr":
        shown = bound.format_node() if bound is not None else repr(value)
        raise RuleDefinitionError(
            f"{what} needs an argument bound to a parameter, buffer or constant of the graph "
            f"module, got {shown}"
        )
    return bound


def _new(name: str, kind: Kind, value: Any, persistent: bool, next_to: Any) -> fx.Proxy:
    if not isinstance(name, str) or not name.isidentifier():
        raise RuleDefinitionError(f"the name of a new {kind} must be an identifier, got {name!r}")
    if not isinstance(value, torch.Tensor):
        raise RuleDefinitionError(f"new {kind} {name!r} must be a tensor, got {type(value)}")
    tracer = active_tracer()
    module = None
    if next_to is not None:
        module = _bound_attribute(next_to, "next_to=").target.rpartition(".")[0]
    return tracer.new_attribute(NewAttribute(name, kind, value, persistent, module))


def new_parameter(name: str, value: torch.Tensor, *, next_to: Any = None) -> fx.Proxy:
    """A new ``nn.Parameter`` (trained, saved) holding ``value``.

    It is registered on the module the match came from, or with ``next_to=w`` (an argument
    bound to a parameter, buffer or constant) on the module that holds ``w``."""
    return _new(name, "parameter", value, True, next_to)


def new_buffer(
    name: str, value: torch.Tensor, *, persistent: bool = True, next_to: Any = None
) -> fx.Proxy:
    """A new buffer holding ``value`` (in ``state_dict`` unless ``persistent=False``);
    placed like :func:`new_parameter`."""
    return _new(name, "buffer", value, persistent, next_to)


def new_constant(name: str, value: torch.Tensor, *, next_to: Any = None) -> fx.Proxy:
    """A new tensor constant holding ``value`` (an attribute, not in ``state_dict``);
    placed like :func:`new_parameter`."""
    return _new(name, "constant", value, True, next_to)


def value_of(value: fx.Proxy) -> torch.Tensor:
    """The real tensor of a replacement argument bound to a parameter, buffer or constant
    (a ``get_attr`` node) of the graph module, e.g. to fold a weight."""
    tracer = active_tracer()
    bound = _bound_attribute(value, "value_of")
    tracer.per_match = True
    return resolve_attribute(bound)


def resolve_attribute(node: fx.Node) -> Any:
    """The object a ``get_attr`` node reads from its graph's module (None if unknown)."""
    module = node.graph.owning_module
    if module is None:
        return None
    obj: Any = module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_parameter(node: Any) -> bool:
    """Whether ``node`` is a ``get_attr`` of an ``nn.Parameter``."""
    return (
        isinstance(node, fx.Node)
        and node.op == "get_attr"
        and isinstance(resolve_attribute(node), nn.Parameter)
    )


def is_buffer(node: Any) -> bool:
    """Whether ``node`` is a ``get_attr`` of a registered buffer."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    module = node.graph.owning_module
    prefix, _, name = node.target.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if module is not None else None
    except AttributeError:
        return False
    return owner is not None and name in owner._buffers


class AttributeJournal:
    """Registers new attributes on a module tree and can remove them again (rollback)."""

    def __init__(self) -> None:
        self._added: list[tuple[nn.Module, str]] = []

    def register(self, root: nn.Module, prefix: str, attribute: NewAttribute) -> str:
        """Register ``attribute`` on the module at ``prefix`` (created if missing) under a
        free name; returns its FQN."""
        owner = root
        for part in prefix.split(".") if prefix else []:
            child = getattr(owner, part, None)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
                self._added.append((owner, part))
            elif not isinstance(child, nn.Module):
                raise RuleDefinitionError(
                    f"cannot add {attribute.kind} {attribute.name!r} under '{prefix}': "
                    f"'{part}' is not a module"
                )
            owner = child
        name, i = attribute.name, 0
        while hasattr(owner, name):
            i += 1
            name = f"{attribute.name}_{i}"
        value = attribute.value
        if attribute.kind == "parameter":
            param = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
            owner.register_parameter(name, param)
        elif attribute.kind == "buffer":
            owner.register_buffer(name, value, persistent=attribute.persistent)
        else:
            setattr(owner, name, value)
        self._added.append((owner, name))
        return f"{prefix}.{name}" if prefix else name

    def rollback(self) -> None:
        for owner, name in reversed(self._added):
            delattr(owner, name)
        self._added.clear()

    def commit(self) -> None:
        self._added.clear()
