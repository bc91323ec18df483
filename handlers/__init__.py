"""Handlers: the :class:`Handler` protocol, its registry and the built-in conversions."""

from torchgraft.handlers.base import Handler
from torchgraft.handlers.registry import get_handler, register_handler, registered

__all__ = ["Handler", "get_handler", "register_handler", "registered"]
