"""The optimizer: handlers' own optimizers for the parameters they claim, AdamW parameter
groups from handler rules for the rest, and handler step hooks.

Handlers are duck-typed; each of these methods is optional:

- ``optimizer_claims() -> list[OptimizerClaim]``: parameters (FQN globs) the handler's own
  optimizer class updates (see :mod:`torchgraft.handlers.claims`).
- ``param_groups() -> list[tuple[list[str], dict]]``: parameter-FQN ``fnmatch`` globs and
  the AdamW options (plus ``lr_scale``, a factor on the LR) for the parameters they match.
- ``pre_optimizer_hook(model_parts)`` / ``post_optimizer_hook(model_parts)``: called around
  every applied ``optimizer.step()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from torchgraft.handlers.claims import conflict_message, resolve_claims
from torchgraft.handlers.roles import parameter_roles
from torchgraft.train.combined import CombinedOptimizer
from torchgraft.train.config import TrainConfig

_GROUP_OPTIONS = frozenset(inspect.signature(torch.optim.AdamW).parameters) - {"params"} | {
    "lr_scale"
}


def is_no_decay(fqn: str, param: torch.Tensor) -> bool:
    """Built-in rule: no weight decay for 1-D parameters (norm weights, biases) and for
    parameters whose FQN contains ``embed`` or ``norm``."""
    name = fqn.lower()
    return param.ndim <= 1 or "embed" in name or "norm" in name


def build_param_groups(
    model: nn.Module,
    handlers: Sequence[object],
    *,
    lr: float,
    weight_decay: float,
    claimed: Collection[str] = (),
) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable parameters of ``model``.

    Each parameter starts from the built-in defaults (``weight_decay`` = 0 if
    :func:`is_no_decay`, else ``weight_decay``; ``lr``). The handlers' ``param_groups()``
    rules are tried in handler order, then rule order: the **first rule with a glob matching
    the parameter's FQN wins**, and its options override those defaults (``lr_scale``
    multiplies the LR). A glob that matches no parameter, or an option AdamW does not know,
    raises ``ValueError``. Parameters in ``claimed`` (FQNs another optimizer updates) are
    left out.
    """
    params = [(fqn, p) for fqn, p in model.named_parameters() if p.requires_grad]
    fqns = [fqn for fqn, _ in params]
    rules: list[tuple[list[str], dict[str, Any]]] = []
    for handler in handlers:
        method = getattr(handler, "param_groups", None)
        if method is None:
            continue
        owner = type(handler).__name__
        for globs, options in method():
            unknown = set(options) - _GROUP_OPTIONS
            if unknown:
                raise ValueError(
                    f"{owner}.param_groups(): unknown optimizer option(s) {sorted(unknown)}; "
                    f"allowed: {sorted(_GROUP_OPTIONS)}"
                )
            for glob in globs:
                if not any(fnmatchcase(fqn, glob) for fqn in fqns):
                    raise ValueError(
                        f"{owner}.param_groups(): glob {glob!r} matches no parameter "
                        f"(parameters look like {fqns[:3]})"
                    )
            rules.append((list(globs), dict(options)))

    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for fqn, param in params:
        if fqn in claimed:
            continue
        rule = next(
            (i for i, (globs, _) in enumerate(rules) if any(fnmatchcase(fqn, g) for g in globs)),
            None,
        )
        no_decay = is_no_decay(fqn, param)
        if (rule, no_decay) not in groups:
            options: dict[str, Any] = {"lr": lr, "weight_decay": 0.0 if no_decay else weight_decay}
            if rule is not None:
                options.update(rules[rule][1])
            options["lr"] *= options.pop("lr_scale", 1.0)
            groups[rule, no_decay] = {"params": [], **options}
        groups[rule, no_decay]["params"].append(param)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, config: TrainConfig, handlers: Sequence[object] = ()
) -> torch.optim.Optimizer:
    """The run's optimizer: each handler's claimed parameters (``optimizer_claims``) go to
    its optimizer class with its options (``lr`` defaulting to the config's), the rest to
    AdamW over :func:`build_param_groups` with the config's LR, betas and weight decay.
    Without claims that is a plain ``AdamW``; with claims, a :class:`CombinedOptimizer`.
    A claim's ``exclude_roles`` are judged on ``model``'s structure
    (:func:`~torchgraft.handlers.roles.parameter_roles`).
    A parameter claimed by two handlers is a ``ValueError`` (``torchgraft check`` reports
    it as an ``overlap`` problem first)."""
    params = [(fqn, p) for fqn, p in model.named_parameters() if p.requires_grad]
    named = [(getattr(h, "display_name", type(h).__name__), h) for h in handlers]
    owners, conflicts = resolve_claims(named, params, parameter_roles(model))
    if conflicts:
        raise ValueError(conflict_message(conflicts[0]))
    groups = build_param_groups(
        model, handlers, lr=config.lr, weight_decay=config.weight_decay, claimed=owners
    )
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        optimizers.append(
            torch.optim.AdamW(
                groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
            )
        )
    claimed: dict[int, tuple[Any, list[torch.Tensor]]] = {}
    plan_order = {name: i for i, (name, _) in enumerate(named)}
    for fqn, param in sorted(
        params, key=lambda item: plan_order.get(owners.get(item[0], ("",))[0], -1)
    ):
        if fqn in owners:
            claim = owners[fqn][1]
            claimed.setdefault(id(claim), (claim, []))[1].append(param)
    for claim, members in claimed.values():  # in plan order, parameters in model order
        optimizers.append(claim.optimizer(members, **{"lr": config.lr, **claim.options}))
    return optimizers[0] if len(optimizers) == 1 else CombinedOptimizer(optimizers)


def register_handler_hooks(
    optimizer: torch.optim.Optimizer, handlers: Sequence[object], model_parts: list[nn.Module]
) -> None:
    """Wire each handler's ``pre_optimizer_hook`` / ``post_optimizer_hook`` (when defined)
    into ``optimizer``'s step pre/post hooks, in handler order, called with ``model_parts``."""
    for handler in handlers:
        pre = getattr(handler, "pre_optimizer_hook", None)
        if pre is not None:
            optimizer.register_step_pre_hook(_step_hook(pre, model_parts))
        post = getattr(handler, "post_optimizer_hook", None)
        if post is not None:
            optimizer.register_step_post_hook(_step_hook(post, model_parts))


def _step_hook(
    fn: Callable[[list[nn.Module]], object], model_parts: list[nn.Module]
) -> Callable[[torch.optim.Optimizer, tuple, dict], None]:
    """Adapt ``fn(model_parts)`` to the ``hook(optimizer, args, kwargs)`` signature."""

    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        fn(model_parts)

    return hook
