"""Assertions for users' own tests: a config (or a plan on a graph) passes every check.

::

    import torchgraft as tg

    def test_my_config_is_clean():
        tg.testing.assert_config_clean("configs/my_run.yaml", expect="configs/my_run.expect.yaml")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import fx

from torchgraft.config import load_config
from torchgraft.passes.expect import compare_expectation, load_expectation
from torchgraft.passes.manager import PassManager
from torchgraft.passes.plan import HandlerSpec
from torchgraft.passes.report import CheckResult

__all__ = ["assert_config_clean", "assert_plan_clean"]


def assert_config_clean(config: str | Path, *, expect: str | Path | None = None) -> CheckResult:
    """Fail unless ``torchgraft check CONFIG [--expect FILE]`` would exit 0.

    A config that cannot be used raises its :class:`~torchgraft.config.ConfigError`;
    problems raise ``AssertionError`` listing them. Returns the check's result.
    """
    expected = load_expectation(expect) if expect is not None else None
    result = load_config(config).check()
    if expected is not None:
        result.problems += compare_expectation(expected, result, expect)
    _assert_ok(result, f"config {config}")
    return result


def assert_plan_clean(
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    inputs: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Fail unless ``PassManager(handlers).check(gm, inputs)`` finds no problem."""
    result = PassManager(handlers).dry_run(gm, inputs)
    _assert_ok(result, "plan")
    return result


def _assert_ok(result: CheckResult, what: str) -> None:
    if not result.ok:
        raise AssertionError(f"{what} has problems\n{result}")
