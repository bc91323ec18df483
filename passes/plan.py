"""Plans: the user's list of handler specs turned into built handlers, or problems.

A plan item is a handler name, ``{name: {option: value}}``, a :class:`HandlerEntry`, a
:class:`~torchgraft.Handler` instance or a Handler class. Beside the options, the reserved
key ``optional: true`` marks a handler that may match nothing (``no_match`` is then not a
problem)::

    ["fuse_rms_norm", {"float8": {"optional": True, "recipe": "rowwise"}}]

Other problems a plan accepts are declared for the whole plan, by kind:
``PassManager(plan, allow=["overlap"])`` (``allow: [overlap]`` in a config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torchgraft.handlers.base import Handler
from torchgraft.handlers.options import OptionError
from torchgraft.handlers.registry import UnknownHandlerError, get_handler
from torchgraft.ir.errors import TorchgraftError
from torchgraft.passes.problems import Problem


@dataclasses.dataclass(frozen=True)
class HandlerEntry:
    """One plan item as a config file writes it, with where it was written."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optional: bool = False
    """The handler may match nothing without that being a ``no_match`` problem."""
    source: str | None = None
    """Config location of the entry (``file:line:col``), quoted by its problems."""
    option_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Config location of each option."""


HandlerSpec = str | Mapping[str, Mapping[str, Any] | None] | HandlerEntry | Handler | type[Handler]
"""A handler name, ``{name: {option: value}}``, a :class:`HandlerEntry`, a handler
instance or a handler class."""


@dataclasses.dataclass(frozen=True)
class Step:
    """A built handler at its place in the user's plan."""

    handler: Handler
    index: int
    """Position in the plan as written: the tie-breaker of the ordering."""
    optional: bool = False
    source: str | None = None

    @property
    def name(self) -> str:
        return self.handler.display_name


def as_entry(spec: HandlerSpec) -> HandlerEntry:
    """The :class:`HandlerEntry` of a name or ``{name: options}`` spec."""
    if isinstance(spec, HandlerEntry):
        return spec
    if isinstance(spec, str):
        return HandlerEntry(spec)
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, options),) = spec.items()
        if options is None:
            options = {}
        if not isinstance(name, str) or not isinstance(options, Mapping):
            raise TorchgraftError(f"a plan item is {{name: {{option: value}}}}; got {spec!r}")
        options = dict(options)
        optional = options.pop("optional", False)
        if not isinstance(optional, bool):
            raise TorchgraftError(f"handler {name!r}: 'optional' must be true or false")
        return HandlerEntry(name, options, optional)
    raise TorchgraftError(
        "a plan item is a handler name, {name: {options}}, a HandlerEntry, a Handler or a "
        f"Handler class; got {spec!r}"
    )


def instantiate(spec: HandlerSpec) -> Handler:
    """Build one handler; raises :class:`UnknownHandlerError` or :class:`OptionError`."""
    if isinstance(spec, Handler):
        return spec
    if isinstance(spec, type) and issubclass(spec, Handler):
        return spec()
    entry = as_entry(spec)
    return get_handler(entry.name)(**entry.options)


def build_plan(specs: Sequence[HandlerSpec]) -> tuple[list[Step], list[Problem]]:
    """Build every handler of the plan; what cannot be built becomes a problem.

    Raises :class:`~torchgraft.TorchgraftError` only for a malformed item (a programming
    error, not a plan problem).
    """
    steps: list[Step] = []
    problems: list[Problem] = []
    for index, spec in enumerate(specs):
        built = isinstance(spec, Handler) or (isinstance(spec, type) and issubclass(spec, Handler))
        entry = HandlerEntry(_built_name(spec)) if built else as_entry(spec)
        try:
            handler = instantiate(spec)
        except UnknownHandlerError as exc:
            problems.append(
                Problem("unknown_handler", (entry.name,), None, None, entry.source, str(exc))
            )
            continue
        except (OptionError, ValueError, TypeError) as exc:
            source = entry.option_sources.get(getattr(exc, "option", None), entry.source)
            problems.append(Problem("bad_option", (entry.name,), None, None, source, str(exc)))
            continue
        step = Step(handler, index, entry.optional, entry.source)
        first = next((s for s in steps if s.name == step.name), None)
        if first is not None:
            message = (
                f"handler '{step.name}' appears twice in the plan (items {first.index + 1} "
                f"and {index + 1}); keep one"
            )
            problems.append(Problem("duplicate", (step.name,), None, None, step.source, message))
            continue
        steps.append(step)
    return steps, problems


def _built_name(spec: Handler | type[Handler]) -> str:
    return spec.display_name if isinstance(spec, Handler) else spec.name or spec.__name__
