"""Expectation files: what a plan did to a model, checked in so CI notices when it changes.

``torchgraft check CONFIG --write-expect FILE`` writes, as YAML, the run order, the
matches per handler and rule, and the op histogram after the run; ``--expect FILE``
compares a new check with it and reports each difference as an ``expect`` problem::

    order: [fuse_rms_norm, float8]
    matches:
      fuse_rms_norm: {rms: 5}
      float8: {linear: 15}
    ops:
      aten.add.Tensor: 12
      torchgraft.float8_linear.default: 15
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from torchgraft.ir.errors import TorchgraftError
from torchgraft.passes.problems import Problem
from torchgraft.passes.report import CheckResult

_HEADER = "# Written by `torchgraft check --write-expect`; compared by `--expect`.\n"


class ExpectationError(TorchgraftError):
    """An expectation file cannot be read or is not one."""


def expectation(result: CheckResult) -> dict[str, Any]:
    """The expectation document of a check: ``order``, ``matches``, ``ops``."""
    matches = result.report.rule_matches if result.report else {}
    return {
        "order": list(result.order),
        "matches": {h: dict(rules) for h, rules in matches.items()},
        "ops": dict(result.ops),
    }


def write_expectation(result: CheckResult, path: str | Path) -> None:
    """Write the expectation of ``result`` to ``path``."""
    text = yaml.safe_dump(expectation(result), sort_keys=False, default_flow_style=False)
    Path(path).write_text(_HEADER + text, encoding="utf-8")


def load_expectation(path: str | Path) -> dict[str, Any]:
    """Read an expectation file; raises :class:`ExpectationError` if it is not one."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpectationError(f"{path}: cannot read the expectation file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ExpectationError(f"{path}: invalid YAML: {exc}") from None
    shape = {"order": list, "matches": dict, "ops": dict}
    if not isinstance(data, dict) or set(data) != set(shape):
        raise ExpectationError(
            f"{path}: an expectation file has exactly the keys order, matches and ops; write one "
            "with `torchgraft check CONFIG --write-expect FILE`"
        )
    for key, kind in shape.items():
        if not isinstance(data[key], kind):
            raise ExpectationError(f"{path}: '{key}' must be a {kind.__name__}")
    if not all(isinstance(rules, dict) for rules in data["matches"].values()):
        raise ExpectationError(f"{path}: 'matches' maps each handler to {{rule: count}}")
    return data


def compare_expectation(
    expected: dict[str, Any], result: CheckResult, path: str | Path
) -> list[Problem]:
    """One ``expect`` problem per difference between ``expected`` and ``result``."""
    actual = expectation(result)
    source = str(path)
    problems = []
    if expected["order"] != actual["order"]:
        problems.append(
            Problem(
                "expect",
                tuple(actual["order"]),
                None,
                None,
                source,
                f"order: expected {_arrow(expected['order'])}, got {_arrow(actual['order'])}",
            )
        )
    want, got = _flatten(expected["matches"]), _flatten(actual["matches"])
    for handler, rule in sorted(want.keys() | got.keys()):
        a, b = want.get((handler, rule)), got.get((handler, rule))
        if a != b:
            message = f"matches of {handler}.{rule}: expected {_count(a)}, got {_count(b)}"
            problems.append(Problem("expect", (handler,), rule, None, source, message))
    for op in sorted(expected["ops"].keys() | actual["ops"].keys()):
        a, b = expected["ops"].get(op, 0), actual["ops"].get(op, 0)
        if a != b:
            message = f"{op} nodes after the run: expected {a}, got {b}"
            problems.append(Problem("expect", (), None, None, source, message))
    return problems


def _flatten(matches: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(str(h), str(r)): n for h, rules in matches.items() for r, n in rules.items()}


def _arrow(names: list) -> str:
    return " -> ".join(map(str, names)) or "(empty)"


def _count(value: Any) -> str:
    return "(absent)" if value is None else str(value)
