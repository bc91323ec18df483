"""Exceptions raised by the engine. Each names what it can: handler, rule, node, source line."""

from __future__ import annotations


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
