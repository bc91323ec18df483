"""Handler registry: the ``register_handler`` decorator and the ``torchgraft.handlers``
entry-point group, through which an installed package adds handlers."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

from torchgraft.ir.errors import TorchgraftError

if TYPE_CHECKING:
    from torchgraft.handlers.base import Handler

ENTRY_POINT_GROUP = "torchgraft.handlers"

_REGISTRY: dict[str, type[Handler]] = {}
_entry_points_loaded = False


class UnknownHandlerError(TorchgraftError):
    """No handler is registered under a name."""

    def __init__(self, name: str, suggestion: str | None) -> None:
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(f"unknown handler {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")
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
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if entry.name not in _REGISTRY:
            register_handler(entry.name)(cls)


def registered() -> dict[str, type[Handler]]:
    """All registered handlers by name (built-ins, decorated classes and entry points)."""
    _load_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def get_handler(name: str) -> type[Handler]:
    """The handler class registered as ``name``; raises with a did-you-mean otherwise."""
    handlers = registered()
    if name in handlers:
        return handlers[name]
    close = difflib.get_close_matches(name, handlers, n=1)
    raise UnknownHandlerError(name, close[0] if close else None)


def _load_builtins() -> None:
    import torchgraft.handlers.builtin  # noqa: F401  (registers the built-in handlers)
