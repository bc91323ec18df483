"""The :class:`Handler` base class: a named conversion made of rules and options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from torch import fx, nn

from torchgraft.handlers.claims import OptimizerClaim
from torchgraft.handlers.options import build_options
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.matcher import find_matches
from torchgraft.ir.provenance import user_source
from torchgraft.ir.rule import Match, Rule

RESERVED_OPTIONS = frozenset({"optional"})
"""Keys a plan entry may set beside a handler's options (``{name: {optional: true}}``)."""

STAGES = ("module", "graph", "joint", "compile")
"""Where a handler runs, in flow order (:attr:`Handler.stage`): ``module`` (``convert`` on
the eager ``nn.Module`` before capture, no rules), ``graph`` (rules over the exported
forward graph), ``joint`` (rules over the joint forward + backward ATen graph of the
training step) and ``compile`` (rules inside ``torch.compile``, as Inductor post-grad pass)."""


class HandlerDefinitionError(TorchgraftError):
    """A Handler subclass declares its ordering, tolerance or options wrongly."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A place where a handler's rule matches but :meth:`Handler.reject` refuses it."""

    node: str
    """Name of the node the rule matched (its anchor)."""
    module_fqn: str
    """FQN of the module it came from."""
    reason: str
    """The text ``reject`` returns, which ``tg.explain`` also shows."""
    source: str | None = None
    """The user's source line that produced the node."""

    def __str__(self) -> str:
        return f"{self.module_fqn or self.node}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ModuleFilter:
    """Module FQN globs a handler filters on, so that ``check`` can report a glob that
    matches no module of the graph (``unmatched_filter``)."""

    name: str
    """Where the globs are set: ``"skip_fqns"`` (an option), ``"rule 'relu' include="``."""
    globs: tuple[str, ...]
    sub_path: bool
    """True: a glob matches a dotted sub-path of the FQN
    (:func:`~torchgraft.ir.provenance.module_glob`); False: the whole FQN (``fnmatch``)."""
    rule: str | None = None


class Handler:
    """A conversion: rules plus typed options, ordering declarations and optimizer hooks.

    Subclass it, declare rules with :func:`torchgraft.rule` in the class body, and register
    it with :func:`torchgraft.register_handler`. Options are a nested ``Options`` dataclass
    (document each field under it); ``Handler(**options)`` validates them. The class also
    satisfies the ``ModelHandler`` protocol training frameworks call:
    ``__init__(job_config, parallel_dims)``, :meth:`convert`,
    :meth:`pre_optimizer_hook` and :meth:`post_optimizer_hook`.

    The ordering declarations name other handlers by registry name; the pass manager
    sorts a plan by them and checks them (:mod:`torchgraft.passes.ordering`). They, the
    tolerance and ``Options`` are checked when the subclass is defined.
    """

    name: ClassVar[str] = ""
    """Registry name, set by :func:`register_handler`."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Handlers that must be in the same plan and run before this one."""
    after: ClassVar[tuple[str, ...]] = ()
    """Handlers that, when present in the plan, run before this one."""
    before: ClassVar[tuple[str, ...]] = ()
    """Handlers that, when present in the plan, run after this one."""
    stage: ClassVar[str] = "graph"
    """Where the handler runs, one of :data:`STAGES`. A ``module`` handler declares no
    rules and overrides :meth:`convert`, which receives the eager ``nn.Module``."""
    sqnr_tolerance: float | None = None
    """Minimum SQNR (dB) of outputs and gradients after this handler in the verify stage
    (a handler whose precision depends on its options may set it per instance in
    ``__init__``); None for exact rewrites (held to rounding-level differences,
    :data:`torchgraft.passes.verify.EXACT_SQNR_DB`). It says how close the handler comes
    to the function it replaces, applied alone to the original graph; see
    :mod:`torchgraft.passes.verify` for how each value is judged."""
    op_sqnr_tolerance: float | None = None
    """Minimum SQNR (dB) of each rewritten place on its own: the replacement against the
    nodes it replaced, on the same inputs, forward outputs and (with the real cotangent) the
    gradients of its inputs and parameters. A lossy handler that declares it gets a
    *calibrated* tolerance on top of ``sqnr_tolerance``: the verify stage measures what
    noise of its per-op error's size costs on the model at hand and holds it to the lower of
    the two (:mod:`torchgraft.passes.verify`, :mod:`torchgraft.passes.calibrate`). None (the
    default): held to ``sqnr_tolerance`` alone. Set it per instance in ``__init__`` when it
    depends on the options, like ``sqnr_tolerance``; it needs a ``sqnr_tolerance``."""
    approximates: ClassVar[bool] = True
    """False for a handler that computes a different function on purpose (``relu`` →
    ``gelu``, a new activation or loss), not an approximation of the one it replaces:
    verify still measures and reports its SQNR, but holds it to no tolerance (it only needs
    finite outputs and gradients of the right shapes). Do not set ``sqnr_tolerance`` too."""

    @dataclasses.dataclass(kw_only=True)
    class Options:
        """This handler takes no options."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"{cls.__module__}.{cls.__qualname__}"
        for attribute in ("requires", "after", "before"):
            value = getattr(cls, attribute)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise HandlerDefinitionError(
                    f"{where}.{attribute} must be a tuple of handler names, got {value!r}"
                    + (f"; write ({value!r},)" if isinstance(value, str) else "")
                )
        _check_stage(cls, where)
        tolerance = cls.sqnr_tolerance
        if tolerance is not None and (
            isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
        ):
            raise HandlerDefinitionError(
                f"{where}.sqnr_tolerance must be a number of dB or None, got {tolerance!r}"
            )
        op_tolerance = cls.op_sqnr_tolerance
        if op_tolerance is not None and (
            isinstance(op_tolerance, bool) or not isinstance(op_tolerance, (int, float))
        ):
            raise HandlerDefinitionError(
                f"{where}.op_sqnr_tolerance must be a number of dB or None, got {op_tolerance!r}"
            )
        if op_tolerance is not None and tolerance is None:
            raise HandlerDefinitionError(
                f"{where} sets op_sqnr_tolerance = {op_tolerance!r} without a sqnr_tolerance: "
                "the per-op tolerance calibrates a lossy handler's model-level one; declare "
                "sqnr_tolerance (dB) too"
            )
        if not isinstance(cls.approximates, bool):
            raise HandlerDefinitionError(
                f"{where}.approximates must be True or False, got {cls.approximates!r}"
            )
        if not cls.approximates and tolerance is not None:
            raise HandlerDefinitionError(
                f"{where} sets approximates = False (a different function: no tolerance) and "
                f"sqnr_tolerance = {tolerance!r}; keep one"
            )
        if not dataclasses.is_dataclass(cls.Options):
            raise HandlerDefinitionError(
                f"{where}.Options must be a dataclass; decorate it with "
                "@dataclasses.dataclass(kw_only=True)"
            )
        reserved = RESERVED_OPTIONS & {f.name for f in dataclasses.fields(cls.Options)}
        if reserved:
            raise HandlerDefinitionError(
                f"{where}.Options may not define {sorted(reserved)}: plan entries use these keys"
            )

    def __init__(self, job_config: Any = None, parallel_dims: Any = None, **options: Any) -> None:
        self.job_config = job_config
        self.parallel_dims = parallel_dims
        self.options = build_options(type(self).Options, options, handler=self.display_name)

    @property
    def display_name(self) -> str:
        return self.name or type(self).__name__

    @classmethod
    def rules(cls) -> list[Rule]:
        """The rules declared in the class body and its bases, in declaration order (bases
        first). A subclass rule of the same name overrides the base's, in the base rule's
        place; a subclass attribute that is not a rule (``relu = None``) removes the base
        rule declared under that attribute."""
        found: dict[str, Rule] = {}
        attributes: dict[str, str] = {}  # attribute → name of the rule declared under it
        for klass in reversed(cls.__mro__):
            for attribute, value in vars(klass).items():
                if isinstance(value, Rule):
                    found[value.name] = value
                    attributes[attribute] = value.name
                elif attribute in attributes:
                    found.pop(attributes.pop(attribute), None)
        return list(found.values())

    def reject(self, match: Match) -> str | None:
        """Instance-level filter applied to every match of this handler's rules.

        Return None to accept the match, or a reason (shown by ``explain``) to skip it.
        The default accepts everything; handlers use it for options like ``skip_fqns``.
        Raising a :class:`~torchgraft.TorchgraftError` (e.g. an ``OptionError``) aborts the
        whole run with that message; the graph is rolled back.
        """
        return None

    def module_filters(self) -> list[ModuleFilter]:
        """The module FQN globs this handler filters on: its rules' ``include`` /
        ``exclude``; handlers with a glob option (``skip_fqns``) add theirs."""
        filters = []
        for rule in self.rules():
            for kind in ("include", "exclude"):
                globs = getattr(rule, kind)
                if globs:
                    filters.append(
                        ModuleFilter(f"rule '{rule.name}' {kind}=", globs, False, rule.name)
                    )
        return filters

    def extra_inputs(self, match: Match) -> dict[str, Any]:
        """Graph values (or literals) the replacement needs beyond what the pattern bound.

        Called for each accepted match before its replacement is traced; each returned
        node must be defined before the match (e.g. a graph input), a literal is a value
        the handler computed from the match (e.g. a window size read off a mask); each
        arrives in the replacement as a keyword argument of that name (declare
        ``**inputs``). It is part of the template cache key like any binding. Default: none.
        """
        return {}

    def param_groups(self) -> list[tuple[list[str], dict[str, Any]]]:
        """Optimizer options for parameters, by FQN ``fnmatch`` glob (training loop hook).

        Each entry is ``(globs, options)``: AdamW keyword arguments (``weight_decay``,
        ``betas``, ``eps`` ...) plus ``lr_scale``, a factor on the LR. The training loop
        tries the rules of all handlers in plan order, then rule order; the first glob
        matching a parameter's FQN wins and its options override the defaults (weight
        decay 0 for 1-D, ``embed`` and ``norm`` parameters). A glob that matches no
        parameter, or an unknown option, is a ``ValueError``. Example:
        ``[(["output.weight"], {"lr_scale": 0.5})]``. Default: none.
        """
        return []

    def lr_multiplier(self, step: int) -> float:
        """Factor on every group's LR at optimizer update ``step`` (0-based, counting applied
        updates; skipped non-finite steps do not advance it), multiplied with the
        warmup-cosine schedule and the other handlers' factors. Default: 1."""
        return 1.0

    def optimizer_claims(self) -> list[OptimizerClaim]:
        """Parameters this handler's own optimizer updates instead of AdamW (training loop
        hook): each :class:`~torchgraft.handlers.claims.OptimizerClaim` names FQN globs, an
        optimizer class and its options. Unclaimed parameters keep AdamW (with
        :meth:`param_groups`). A parameter claimed by two handlers is an ``overlap``
        problem. Default: none."""
        return []

    def lr_schedule(self, total_steps: int) -> Callable[[int], float] | None:
        """The LR factor as a function of the optimizer update step (0-based) of a run of
        ``total_steps`` updates, replacing the built-in warmup-cosine schedule;
        :meth:`lr_multiplier` factors still apply. A handler supplies a schedule by
        overriding this; two in one plan are an ``overlap`` problem. Default: None."""
        return None

    def activation_policy(self, node: fx.Node) -> str | None:
        """Joint stage: ``"save"`` or ``"recompute"`` to make the min-cut partitioner keep
        forward op ``node``'s output for the backward or recompute it there, or None to
        leave the choice to the partitioner. Called once per forward op node of the joint
        graph, after the rules ran; the first handler of the plan with an opinion wins.
        Default: None."""
        return None

    def skipped(self, gm: fx.GraphModule) -> list[Skipped]:
        """Places in ``gm`` where this handler's rules match but :meth:`reject` refuses
        them (left alone, e.g. by ``skip_fqns`` or an unsupported shape), with the reason.
        After a run, these are exactly the matches the handler did not rewrite."""
        if type(self).reject is Handler.reject:  # accepts everything: nothing to look for
            return []
        skipped: dict[fx.Node, Skipped] = {}
        accepted: set[fx.Node] = set()  # another rule of this handler takes it
        for rule in self.rules():
            for match in find_matches(gm.graph, rule):  # without the handler: reject() not applied
                anchor = match.anchor
                reason = self.reject(match)
                if not reason:
                    accepted.add(anchor)
                elif anchor not in skipped:  # two rules match it: the first reason is listed
                    skipped[anchor] = Skipped(
                        anchor.name, match.module_fqn, reason, user_source(anchor)
                    )
        return [s for anchor, s in skipped.items() if anchor not in accepted]

    def convert(self, model: nn.Module) -> nn.Module:
        """Rewrite a captured graph module in place with this handler and return it.

        A ``module``-stage handler overrides this: it converts the eager ``nn.Module``
        (swapping or adding submodules) and returns it; the pass manager runs it before
        capture (:meth:`torchgraft.PassManager.convert_module`). For the other stages it
        raises :class:`~torchgraft.CheckError` (graph unchanged) for any problem
        ``PassManager([self]).check`` reports, e.g. ``no_match`` when it matches nothing."""
        if not isinstance(model, fx.GraphModule):
            raise TypeError(
                f"{self.display_name}.convert expects a graph module from tg.capture(model, args); "
                f"got {type(model).__name__}"
            )
        from torchgraft.passes.manager import PassManager

        PassManager([self]).run(model)
        return model

    def pre_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        """Called before each ``optimizer.step()``. Default: nothing."""

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        """Called after each ``optimizer.step()``. Default: nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def _check_stage(cls: type[Handler], where: str) -> None:
    """A stage is one of :data:`STAGES`; only a ``joint`` handler sets activation
    policies; a ``module`` handler has no rules and its own ``convert``."""
    if cls.stage not in STAGES:
        raise HandlerDefinitionError(
            f"{where}.stage must be one of {', '.join(repr(s) for s in STAGES)}, got {cls.stage!r}"
        )
    if cls.activation_policy is not Handler.activation_policy and cls.stage != "joint":
        raise HandlerDefinitionError(
            f"{where} overrides activation_policy, which only the 'joint' stage uses, but has "
            f"stage {cls.stage!r}; set stage = 'joint'"
        )
    if cls.stage != "module":
        return
    if cls.rules():
        names = ", ".join(rule.name for rule in cls.rules())
        raise HandlerDefinitionError(
            f"{where} has stage 'module' but declares rules ({names}): module-stage handlers "
            "convert the eager nn.Module in convert(model); put rules in a 'graph' handler"
        )
    if cls.convert is Handler.convert:
        raise HandlerDefinitionError(
            f"{where} has stage 'module' but does not override convert(model), which is "
            "what a module-stage handler runs"
        )
