"""Exceptions raised by the engine. Each names what it can: handler, rule, node, source line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class TorchgraftError(Exception):
    """Base class of every error torchgraft raises on purpose."""


class CaptureError(TorchgraftError):
    """The model could not be turned into a graph."""


class RuleDefinitionError(TorchgraftError):
    """A rule's pattern or replacement is malformed (raised when the rule is declared)."""


class RewriteError(TorchgraftError):
    """A replacement failed while a plan ran; the graph was rolled back unchanged."""

    def __init__(
        self,
        message: str,
        *,
        handler: str | None,
        rule: str | None,
        node: str | None,
        source: str | None,
    ) -> None:
        super().__init__(message)
        self.handler = handler
        self.rule = rule
        self.node = node
        self.source = source


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Keep torch's fake-tensor logger from printing the traceback of an error that
    torchgraft reports itself, in one line (it logs the failing op before re-raising)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled
