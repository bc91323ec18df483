"""Rules: a pattern, a replacement and filters, declared with :func:`rule`."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from torchgraft.ir.errors import RuleDefinitionError
from torchgraft.ir.pattern import Pattern
from torchgraft.ir.provenance import module_fqn, user_source

if TYPE_CHECKING:
    from torchgraft.handlers.base import Handler

aten = torch.ops.aten

COMMUTATIVE = frozenset(
    {aten.add.Tensor, aten.mul.Tensor, aten.maximum.default, aten.minimum.default}
)
"""ATen ops whose first two operands commute (``add`` only with its default ``alpha=1``)."""


@dataclasses.dataclass(eq=False)
class Match:
    """One place where a rule's pattern matched, handed to ``where`` predicates.

    ``m["w"]`` is what parameter ``w`` bound: the node's ``meta["val"]`` (a fake tensor with
    ``.shape`` and ``.dtype``) for a node, the value itself for a literal.
    """

    rule: Rule
    anchor: fx.Node
    """The graph node that matched the pattern's (first) output."""
    nodes: dict[str, fx.Node]
    """Pattern node name → matched graph node, for every op of the pattern."""
    bindings: dict[str, Any]
    """Pattern parameter → bound graph node or literal."""
    outputs: list[fx.Node]
    handler: Handler | None = None

    @property
    def module_fqn(self) -> str:
        """FQN of the module the anchor node came from (e.g. ``layers.0.attention.wq``)."""
        return module_fqn(self.anchor)

    @property
    def source(self) -> str | None:
        """The user's source line that produced the anchor node."""
        return user_source(self.anchor)

    def __getitem__(self, name: str) -> Any:
        value = self.bindings[name]
        return value.meta.get("val") if isinstance(value, fx.Node) else value

    def node(self, name: str) -> fx.Node:
        """The graph node bound to parameter ``name`` (or matched by pattern node ``name``)."""
        value = self.bindings.get(name, self.nodes.get(name))
        if not isinstance(value, fx.Node):
            raise KeyError(f"{name!r} is not bound to a node in this match")
        return value

    @property
    def replaced(self) -> list[fx.Node]:
        """The matched graph nodes, in pattern order."""
        return list(self.nodes.values())


def _location(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


class Rule:
    """A pattern → replacement rewrite with filters. Declare with :func:`rule`."""

    def __init__(
        self,
        pattern: Callable,
        *,
        name: str | None = None,
        where: Callable[[Match], bool] | None = None,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        commutative: Iterable[Any] = (),
        check_outputs: bool = True,
    ) -> None:
        self.name = name or getattr(pattern, "__name__", type(pattern).__name__)
        self._named = name is not None
        self.location = _location(type(pattern) if isinstance(pattern, nn.Module) else pattern)
        self.pattern = Pattern(pattern, where=f"'{self.name}' ({self.location})")
        self.where = where
        self.include = _globs(include, "include")
        self.exclude = _globs(exclude, "exclude")
        self.commutative = frozenset(COMMUTATIVE if commutative is True else commutative)
        self.check_outputs = check_outputs
        """Refuse replacement outputs whose shape or dtype differ from the matched ones."""
        self.replace_fn: Callable | None = None
        self.wants_handler = False
        self.argument_names: dict[str, str] = {}
        """Pattern parameter → the replacement's parameter that receives it."""

    def replacement(self, fn: Callable) -> Callable:
        """Decorator: attach the replacement, a function of the pattern's parameters.

        It may be a function, an ``nn.Module`` or an ``fx.GraphModule`` (called with the
        values; its submodules' computations are inlined and the tensors they use become
        state of each match, see :mod:`torchgraft.ir.state`). The replacement is traced
        with the matched values: tensor parameters arrive as
        proxies whose ``.shape`` / ``.dtype`` are the matched node's, literal parameters
        as their values. An optional first parameter ``self`` receives the handler
        instance (its options). It returns one value per pattern output.

        Parameters bind by name when every one of them names a pattern parameter (a
        ``**inputs`` parameter takes the rest, and the handler's ``extra_inputs``);
        otherwise by position, as ``torch.fx.replace_pattern`` does, when there are as
        many as the pattern has and none names a pattern parameter at another position.
        """
        params = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters
        names = list(params)
        self.wants_handler = bool(names) and names[0] == "self"
        takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        names = [
            n for n in names[self.wants_handler :] if params[n].kind is not params[n].VAR_KEYWORD
        ]
        wanted = self.pattern.params
        missing = [p for p in wanted if p not in names and not takes_var_kw]
        unknown = [n for n in names if n not in wanted]
        if not missing and not unknown:
            self.argument_names = {p: p for p in wanted}
        elif (
            len(names) == len(wanted)
            and not takes_var_kw
            and all(n not in wanted or wanted.index(n) == i for i, n in enumerate(names))
        ):
            self.argument_names = dict(zip(wanted, names))
        else:
            detail = []
            if missing:
                detail.append(f"does not accept the pattern's parameters {missing}")
            if unknown:
                detail.append(f"has parameters {unknown} that the pattern does not bind")
            shown = getattr(fn, "__name__", type(fn).__name__)
            raise RuleDefinitionError(
                f"rule '{self.name}' ({self.location}): replacement {shown!r} "
                + " and ".join(detail)
                + f"; the pattern binds {wanted} (by name, or by position with "
                f"{len(wanted)} parameters)"
            )
        self.replace_fn = fn
        return fn

    def __set_name__(self, owner: type, attribute: str) -> None:
        # ``relu = tg.rule(shared_pattern)`` names the rule after its attribute.
        if not self._named:
            self.name = attribute
            self._named = True

    def __repr__(self) -> str:
        return f"<Rule {self.name} at {self.location}>"


def _globs(value: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    globs = tuple(value)
    if not all(isinstance(g, str) for g in globs):
        raise RuleDefinitionError(f"{what} must be module FQN glob strings, got {globs!r}")
    return globs


def rule(pattern: Callable | None = None, /, **options: Any) -> Rule | Callable[[Callable], Rule]:
    """Declare a rewrite rule; works bare (``@tg.rule``) and with keywords.

    Keywords: ``name``; ``where`` (predicate on the :class:`Match`); ``include`` /
    ``exclude`` (module FQN globs, matched against ``m.module_fqn``); ``commutative``
    (ops whose first two operands may match in either order, or ``True`` for
    :data:`COMMUTATIVE`); ``check_outputs=False`` for a rule that changes the shape or dtype
    of what it replaces on purpose (by default that is a ``RewriteError``; the graph's later
    nodes keep their old ``meta["val"]``). Attach the replacement with ``@<rule>.replacement``::

        class ReluToGelu(tg.Handler):
            @tg.rule(exclude=["output"])
            def relu(x):
                return aten.relu.default(x)

            @relu.replacement
            def _(x):
                return aten.gelu.default(x)
    """
    if pattern is not None:
        return Rule(pattern, **options)
    return lambda fn: Rule(fn, **options)
