"""The ``compile`` stage: rules inside ``torch.compile``, as one Inductor post-grad pass.

Inductor has one slot for a custom post-grad pass
(``torch._inductor.config.post_grad_custom_post_pass``). :class:`CompileStagePass` fills
it with one pass that first runs whatever pass was already installed (the user's own),
then every ``compile``-stage handler of the plan in order, over Inductor's post-grad ATen
graph (decomposed by Inductor: ``silu`` is already ``x * sigmoid(x)`` there), with the same
rule machinery, transaction and checks as the other stages. Matches are counted into the
report when a graph is compiled: a graph loaded from Inductor's FX graph cache is not
compiled, so it adds none.

Its :meth:`~CompileStagePass.uuid`, part of the FX graph cache key, hashes the source of
every compile-stage handler class (which holds its rules), its options, the plan's stage
order and the uuid of the composed pass: an unchanged second run hits the cache, changing a
rule or an option misses it. When a source or the composed pass's uuid is unavailable,
the uuid is None and Inductor bypasses its cache rather than reuse a stale graph.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch._inductor.config as inductor_config
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from torchgraft.handlers.base import Handler
from torchgraft.passes.plan import Step
from torchgraft.passes.problems import CheckError
from torchgraft.passes.report import Report
from torchgraft.passes.stages import backward_module_stacks, stage_names

if TYPE_CHECKING:
    from torchgraft.passes.manager import PassManager

CONFIG_KEY = "post_grad_custom_post_pass"
"""The Inductor config entry the pass is installed under."""


class CompileStagePass(CustomGraphPass):
    """The user's pass (``previous``), then the plan's compile-stage handlers."""

    def __init__(
        self,
        steps: list[Step],
        rewrite: Callable[[fx.GraphModule], Report],
        report: Report,
        plan: dict[str, list[str]],
        previous: Callable[[fx.Graph], None] | None = None,
    ) -> None:
        self.steps = steps
        self.plan = plan
        self.rewrite = rewrite
        self.report = report
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        owner = graph.owning_module
        if owner is None:
            owner = fx.GraphModule(torch.nn.Module(), graph)
        backward_module_stacks(graph)
        stage_report = self.rewrite(owner)
        stage_report.stages = {}
        self.report.merge(stage_report)

    def uuid(self) -> str | None:
        parts = [f"{s.name}|{_source(type(s.handler))}|{s.handler.options!r}" for s in self.steps]
        if any(p.split("|")[1] == "" for p in parts):
            return None
        if self.previous is not None:
            previous = getattr(self.previous, "uuid", None)
            previous_id = previous() if previous is not None else None
            if previous_id is None:
                return None
            parts.append(f"previous|{previous_id!r}")
        parts.append(f"plan|{sorted(self.plan.items())!r}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _source(cls: type) -> str:
    """The source of ``cls`` and of its bases up to :class:`Handler` ('' if unavailable)."""
    try:
        return "\n".join(
            inspect.getsource(klass)
            for klass in cls.__mro__
            if issubclass(klass, Handler) and klass is not Handler
        )
    except (OSError, TypeError):
        return ""


def cache_counts() -> dict[str, int]:
    """Inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {
        "cache_hits": inductor["fxgraph_cache_hit"],
        "cache_misses": inductor["fxgraph_cache_miss"],
    }


def compile_with_stage(
    pm: PassManager,
    module: nn.Module,
    report: Report | None = None,
    *,
    rewrite: Callable[[fx.GraphModule], Report] | None = None,
    **compile_kwargs: Any,
) -> nn.Module:
    """:meth:`PassManager.compile_module`: ``torch.compile`` with ``pm``'s compile-stage
    handlers installed for this compile (composed with the pass already configured or given
    in ``options``), or a plain ``torch.compile`` without them. ``rewrite`` replaces how
    each post-grad graph is rewritten (default: ``pm.rewrite_stage``, without ``no_match``,
    which is judged over all graphs of a compile by ``torchgraft check``)."""
    if pm.problems:
        raise CheckError(pm.problems)
    steps = pm.stage_steps("compile")
    if not steps:
        return torch.compile(module, **compile_kwargs)
    if report is None:
        report = Report(order=pm.order, stages=stage_names(pm.steps))
    if rewrite is None:

        def rewrite(owner: fx.GraphModule) -> Report:
            return pm.rewrite_stage(owner, "compile", no_match=False)

    options = dict(compile_kwargs.pop("options", None) or {})
    previous = options.get(CONFIG_KEY, getattr(inductor_config, CONFIG_KEY))
    options[CONFIG_KEY] = CompileStagePass(steps, rewrite, report, stage_names(pm.steps), previous)
    return torch.compile(module, options=options, **compile_kwargs)
