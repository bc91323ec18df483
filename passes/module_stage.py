"""The ``module`` stage: handlers' ``convert(model)`` on the eager ``nn.Module``, before
capture, as one transaction.

A module-stage conversion swaps or adds submodules and parameters (LoRA adapters, an
attention implementation). Its "matches" are the new submodule objects in the model
afterwards (a wrapper counts once, the module it wraps is not new): a non-optional
handler that changed none is a ``no_match`` problem, like a graph handler that rewrote
nothing. If a handler raises, every module's children, parameters, buffers and
``requires_grad`` flags are put back as they were.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

from torchgraft.passes.plan import Step
from torchgraft.passes.problems import Problem
from torchgraft.passes.report import Report

RULE = "convert"
"""The rule name a module-stage handler's matches are reported under."""


def convert_module(model: nn.Module, steps: Sequence[Step], report: Report) -> None:
    """Run each step's ``convert`` on ``model`` (in place), counting into ``report``."""
    saved = _snapshot(model)
    try:
        for step in steps:
            before = {id(m) for m in model.modules()}
            start = time.perf_counter()
            result = step.handler.convert(model)
            report.seconds[step.name] = time.perf_counter() - start
            if result is not model:
                raise TypeError(
                    f"module-stage handler '{step.name}'.convert(model) returned "
                    f"{type(result).__name__} object {id(result):#x}, not the model it was "
                    "given: a module-stage conversion changes the model in place and returns it"
                )
            changed = [f for f, m in model.named_modules() if id(m) not in before]
            report.rule_matches[step.name] = {RULE: len(changed)}
            if not changed and not step.optional:
                report.problems.append(_no_match(step))
    except BaseException:
        _restore(saved)
        raise


def _no_match(step: Step) -> Problem:
    return Problem(
        "no_match",
        (step.name,),
        RULE,
        None,
        step.source,
        f"handler '{step.name}' (stage 'module') replaced or added no submodule of the model; "
        f"check its options, or mark it optional ({{{step.name}: {{optional: true}}}}) if "
        "that is expected",
    )


_Snapshot = list[tuple[nn.Module, dict, dict, dict, dict]]


def _snapshot(model: nn.Module) -> _Snapshot:
    return [
        (
            m,
            dict(m._modules),
            dict(m._parameters),
            dict(m._buffers),
            {n: p.requires_grad for n, p in m._parameters.items() if p is not None},
        )
        for m in model.modules()
    ]


def _restore(saved: _Snapshot) -> None:
    for module, children, params, buffers, grads in saved:
        for table, old in (
            (module._modules, children),
            (module._parameters, params),
            (module._buffers, buffers),
        ):
            table.clear()
            table.update(old)
        for name, flag in grads.items():
            module._parameters[name].requires_grad_(flag)
