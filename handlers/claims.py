"""Optimizer claims: a handler asks for its own optimizer on the parameters it names.

A handler's :meth:`~torchgraft.Handler.optimizer_claims` returns :class:`OptimizerClaim`
objects; :func:`resolve_claims` decides, for every trainable parameter, which claim (if
any) owns it. The training loop builds one optimizer per claim and AdamW for the rest;
the pass manager reports a parameter claimed by two handlers as an ``overlap`` problem.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class OptimizerClaim:
    """The parameters one optimizer class (with its options) updates instead of AdamW."""

    params: tuple[str, ...]
    """Parameter FQN ``fnmatch`` globs the claim covers (e.g. ``("layers.*",)``)."""
    optimizer: type[torch.optim.Optimizer]
    """The optimizer class, constructed as ``optimizer(param_groups, **options)``."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the optimizer (``lr`` is the peak LR of its parameters; the
    LR schedule scales it like AdamW's)."""
    exclude: tuple[str, ...] = ()
    """FQN globs left out of the claim even if ``params`` matches them."""
    ndim: int | None = None
    """Only parameters with this many dimensions (e.g. 2 for matrix optimizers)."""
    exclude_roles: tuple[str, ...] = ()
    """Roles left out of the claim, found by structure rather than name
    (:func:`~torchgraft.handlers.roles.parameter_roles`: ``"embedding"``, ``"head"``)."""

    def __post_init__(self) -> None:
        for field in ("params", "exclude", "exclude_roles"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(g, str) for g in value):
                raise TypeError(
                    f"OptimizerClaim.{field} must be a tuple of FQN globs, got {value!r}"
                )
        if not (
            isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"OptimizerClaim.optimizer must be a torch.optim.Optimizer subclass, got {self.optimizer!r}"
            )
        accepted = inspect.signature(self.optimizer).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            unknown = sorted(set(self.options) - set(accepted) | ({"params"} & set(self.options)))
            if unknown:
                raise TypeError(
                    f"OptimizerClaim: {self.optimizer.__name__} has no option(s) {unknown}; "
                    f"it takes {sorted(set(accepted) - {'params'})}"
                )

    def covers(self, fqn: str, param: torch.Tensor, roles: Collection[str] = frozenset()) -> bool:
        """Whether this claim owns parameter ``fqn``, whose structural roles are ``roles``."""
        return (
            any(fnmatchcase(fqn, g) for g in self.params)
            and not any(fnmatchcase(fqn, g) for g in self.exclude)
            and not set(self.exclude_roles) & set(roles)
            and (self.ndim is None or param.ndim == self.ndim)
        )


@dataclasses.dataclass(frozen=True)
class ClaimConflict:
    """A parameter that two handlers claim."""

    param: str
    handlers: tuple[str, str]
    """The two handlers, in plan order."""
    more: int = 0
    """How many other parameters the same two handlers both claim."""


def resolve_claims(
    handlers: Iterable[tuple[str, object]],
    named_params: Sequence[tuple[str, torch.Tensor]],
    roles: Mapping[str, Collection[str]] | None = None,
) -> tuple[dict[str, tuple[str, OptimizerClaim]], list[ClaimConflict]]:
    """Parameter FQN → ``(handler name, claim)`` for every claimed parameter, and the
    conflicts (one per pair of handlers claiming a common parameter). ``roles`` are the
    parameters' structural roles (:func:`~torchgraft.handlers.roles.parameter_roles`), which
    ``exclude_roles`` of a claim leave out.

    ``handlers`` are ``(name, handler)`` pairs in plan order; a handler without
    ``optimizer_claims`` claims nothing. Within one handler the first claim covering a
    parameter owns it; across handlers, a second owner is a conflict (the first keeps it).
    """
    owners: dict[str, tuple[str, OptimizerClaim]] = {}
    shared: dict[tuple[str, str], list[str]] = {}
    for name, handler in handlers:
        method = getattr(handler, "optimizer_claims", None)
        claims = method() if method is not None else []
        mine: set[str] = set()
        for claim in claims:
            for fqn, param in named_params:
                if fqn in mine or not claim.covers(fqn, param, (roles or {}).get(fqn, ())):
                    continue
                mine.add(fqn)
                if fqn in owners:
                    shared.setdefault((owners[fqn][0], name), []).append(fqn)
                else:
                    owners[fqn] = (name, claim)
    conflicts = [ClaimConflict(fqns[0], pair, len(fqns) - 1) for pair, fqns in shared.items()]
    return owners, conflicts


def conflict_message(conflict: ClaimConflict) -> str:
    """The sentence that explains a :class:`ClaimConflict` and what to do."""
    a, b = conflict.handlers
    more = f" (and {conflict.more} more)" if conflict.more else ""
    return (
        f"handlers '{a}' and '{b}' both claim parameter '{conflict.param}'{more} for their "
        f"optimizers; only one optimizer can update a parameter. Narrow one claim (its "
        "params / exclude globs) or drop one handler"
    )
