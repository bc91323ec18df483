"""The pass manager: turns handler specs into handlers and applies them as one transaction."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import fx

from torchgraft.handlers.base import Handler
from torchgraft.handlers.registry import get_handler
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.rewriter import GraphEditor, RuleApplier
from torchgraft.passes.report import Report

HandlerSpec = str | Mapping[str, Mapping[str, Any]] | Handler | type[Handler]
"""A handler name, ``{name: {option: value}}``, a handler instance or a handler class."""


def instantiate(spec: HandlerSpec) -> Handler:
    """Build a handler from a spec; names are looked up in the registry."""
    if isinstance(spec, Handler):
        return spec
    if isinstance(spec, type) and issubclass(spec, Handler):
        return spec()
    if isinstance(spec, str):
        return get_handler(spec)()
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, options),) = spec.items()
        return get_handler(name)(**dict(options or {}))
    raise TorchgraftError(
        f"a handler is given as a name, {{name: {{options}}}}, a Handler or a Handler class; got {spec!r}"
    )


class PassManager:
    """Applies an ordered plan of handlers to a captured graph, all or nothing.

    Example::

        gm = tg.capture(model, (tokens,))
        report = tg.PassManager(["float8", {"flex_attention": {"mask": "causal"}}]).run(gm)
        report.matches            # {"float8": 13, "flex_attention": 2}
    """

    def __init__(self, handlers: Sequence[HandlerSpec]) -> None:
        if isinstance(handlers, (str, Mapping, Handler)):
            handlers = [handlers]
        self.handlers: list[Handler] = [instantiate(spec) for spec in handlers]

    def run(self, gm: fx.GraphModule) -> Report:
        """Rewrite ``gm`` in place; if any rule raises, ``gm`` is left exactly as it was."""
        editor = GraphEditor(gm.graph)
        applier = RuleApplier(editor)
        report = Report(order=[h.display_name for h in self.handlers])
        try:
            for handler in self.handlers:
                start = time.perf_counter()
                counts = report.rule_matches.setdefault(handler.display_name, {})
                for rule in handler.rules():
                    records = applier.apply(rule, handler, handler.display_name)
                    counts[rule.name] = counts.get(rule.name, 0) + len(records)
                    report.records.extend(records)
                report.seconds[handler.display_name] = time.perf_counter() - start
            editor.commit()
        except BaseException:
            editor.rollback()
            raise
        start = time.perf_counter()
        gm.recompile()
        report.seconds["recompile"] = time.perf_counter() - start
        return report
