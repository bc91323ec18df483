"""Handler registry: the ``register_handler`` decorator and the ``torchgraft.handlers``
entry-point group, through which an installed package adds handlers.

A package registers its handlers by declaring them in its ``pyproject.toml``::

    [project.entry-points."torchgraft.handlers"]
    my_conversion = "my_package.handlers:MyConversion"

Entry points are loaded lazily, the first time the registry is read. One that fails to
load does not break the others: asking for its name raises with the load error.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

from torchgraft.ir.errors import TorchgraftError

if TYPE_CHECKING:
    from torchgraft.handlers.base import Handler

ENTRY_POINT_GROUP = "torchgraft.handlers"

_REGISTRY: dict[str, type[Handler]] = {}
_ENTRY_POINT_ERRORS: dict[str, str] = {}
_entry_points_loaded = False


class UnknownHandlerError(TorchgraftError):
    """No handler is registered under a name (or its entry point failed to load)."""

    def __init__(self, name: str, suggestion: str | None, load_error: str | None = None) -> None:
        if load_error is not None:
            message = f"handler {name!r} is declared by an installed package but {load_error}"
        else:
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            known = ", ".join(sorted(_REGISTRY)) or "none"
            message = f"unknown handler {name!r}{hint} (known: {known})"
        super().__init__(message)
        self.name = name
        self.suggestion = suggestion


def register_handler(name: str) -> Callable[[type[Handler]], type[Handler]]:
    """Class decorator: register a :class:`~torchgraft.Handler` subclass under ``name``."""

    def decorate(cls: type[Handler]) -> type[Handler]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise TorchgraftError(
                f"handler name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    from torchgraft.handlers.base import Handler

    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin must not break every other handler
            _ENTRY_POINT_ERRORS[entry.name] = (
                f"its entry point {entry.value!r} failed to load: {type(exc).__name__}: {exc}"
            )
            continue
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            _ENTRY_POINT_ERRORS[entry.name] = (
                f"its entry point {entry.value!r} is {cls!r}, not a torchgraft.Handler subclass"
            )
            continue
        if entry.name not in _REGISTRY:  # loading may have registered it by decorator
            register_handler(entry.name)(cls)


def reload_entry_points() -> None:
    """Forget which entry points were loaded, so packages installed since are seen."""
    global _entry_points_loaded
    importlib.invalidate_caches()
    _entry_points_loaded = False
    _ENTRY_POINT_ERRORS.clear()


def registered() -> dict[str, type[Handler]]:
    """All registered handlers by name (built-ins, decorated classes and entry points)."""
    _load_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def entry_point_errors() -> dict[str, str]:
    """Entry-point name → why it failed to load (after :func:`registered` has run)."""
    return dict(_ENTRY_POINT_ERRORS)


def get_handler(name: str) -> type[Handler]:
    """The handler class registered as ``name``; raises with a did-you-mean otherwise."""
    handlers = registered()
    if name in handlers:
        return handlers[name]
    close = difflib.get_close_matches(name, handlers, n=1)
    raise UnknownHandlerError(name, close[0] if close else None, _ENTRY_POINT_ERRORS.get(name))


def _load_builtins() -> None:
    """Register the built-in handlers. Importing their modules registers them once; a
    registry replaced since (a test's copy, put back) gets them again from the classes."""
    from torchgraft.handlers.base import Handler
    from torchgraft.handlers.builtin import MODULES

    for module in MODULES:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Handler)
                and value.__module__ == module.__name__
                and "name" in vars(value)
            ):
                _REGISTRY.setdefault(value.name, value)
