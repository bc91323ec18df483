"""Results: what a run did (:class:`Report`) and what a check found (:class:`CheckResult`)."""

from __future__ import annotations

import dataclasses
import math

from torchgraft.handlers.base import Skipped
from torchgraft.ir.rewriter import MatchRecord
from torchgraft.passes.problems import Problem, format_problems
from torchgraft.passes.verify import HandlerSqnr


@dataclasses.dataclass
class Report:
    """What :meth:`PassManager.run` did to a graph."""

    order: list[str]
    """Handler names in the order they ran."""
    stages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Stage → its handler names in run order (the stages the plan uses, in flow order)."""
    rule_matches: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Handler → rule → number of matches rewritten."""
    records: list[MatchRecord] = dataclasses.field(default_factory=list)
    """One record per rewritten match, in application order."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Handler → seconds spent matching and rewriting (``"recompile"`` for the final one)."""
    sqnr: dict[str, HandlerSqnr] = dataclasses.field(default_factory=dict)
    """Handler → SQNR measured after it, when the run was verified: its step (against the
    graph before it), alone (by itself on the original graph) and total (against the
    original graph), and its tolerance."""
    problems: list[Problem] = dataclasses.field(default_factory=list)
    """Problems that did not stop the run: those of a kind the plan allows
    (``PassManager(..., allow=[...])``)."""
    skipped: dict[str, list[Skipped]] = dataclasses.field(default_factory=dict)
    """Handler → places its rules match but its ``reject`` refused (e.g. ``skip_fqns``,
    unsupported shapes), left alone, with the reason."""

    @property
    def matches(self) -> dict[str, int]:
        """Handler name → number of rewrites applied, in run order."""
        return {name: sum(self.rule_matches.get(name, {}).values()) for name in self.order}

    def merge(self, other: Report) -> Report:
        """Add what another stage of the same plan did (its matches, records, timings,
        problems, skipped places) to this report; returns this report."""
        for name, rules in other.rule_matches.items():
            counts = self.rule_matches.setdefault(name, {})
            for rule, count in rules.items():
                counts[rule] = counts.get(rule, 0) + count
        self.records.extend(other.records)
        self.seconds.update(other.seconds)
        self.problems.extend(other.problems)
        self.skipped.update({k: v for k, v in other.skipped.items() if v})
        self.sqnr.update(other.sqnr)
        return self

    def stage_matches(self) -> dict[str, dict[str, int]]:
        """Stage → handler → matches (the ``metrics.json`` / ``--json`` form)."""
        return {
            stage: {name: sum(self.rule_matches.get(name, {}).values()) for name in names}
            for stage, names in self.stages.items()
        }

    def __str__(self) -> str:
        header = ["handler", "rule", "matches", "ms"]
        calibrated = any(s.calibrated_db is not None for s in self.sqnr.values())
        if self.sqnr:
            header += ["SQNR dB", "alone dB", "total dB", "tolerance"]
        if calibrated:
            header += ["declared", "calibrated", "op dB", "op tol"]
        rows = [header]
        for name in self.order:
            rules = self.rule_matches.get(name, {})
            row = [name, "", str(sum(rules.values())), f"{1e3 * self.seconds.get(name, 0.0):.1f}"]
            if self.sqnr:
                s = self.sqnr.get(name)
                row += _sqnr_cells(s, calibrated) if s else [""] * (len(header) - 4)
            rows.append(row)
            rows.extend(
                ["", rule, str(count)] + [""] * (len(header) - 3) for rule, count in rules.items()
            )
        text = table(rows)
        if set(self.stages) - {"graph"}:
            text += "\nstages: " + "; ".join(
                f"{stage}: {', '.join(names)}" for stage, names in self.stages.items()
            )
        for name, skipped in self.skipped.items():
            if skipped:
                text += f"\n{name} left {len(skipped)} alone:"
                text += "".join(f"\n  {s}" for s in skipped)
        if self.problems:
            text += "\n" + format_problems(self.problems)
        return text


@dataclasses.dataclass
class CheckResult:
    """What :meth:`PassManager.dry_run` found; :meth:`PassManager.check` returns ``problems``."""

    order: list[str]
    """The plan's handler names in run order."""
    problems: list[Problem]
    report: Report | None = None
    """The dry run's report; None when plan problems kept the plan from running."""
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    """Op histogram of the graph after the dry run (op name → count)."""
    allowed: list[Problem] = dataclasses.field(default_factory=list)
    """Problems of a kind the plan allows (``allow: [kinds]``): shown, but not failures."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def matches(self) -> dict[str, int]:
        return self.report.matches if self.report else {}

    def to_json(self) -> dict:
        """The ``torchgraft check --json`` document. ``sqnr_db`` is what the verify stage
        measured, one entry per handler in run order, with the fields of ``metrics.json``'s
        ``sqnr_db`` (:class:`~torchgraft.passes.verify.HandlerSqnr`); empty when the plan
        did not run. Its floats may be infinite: print it with
        :func:`~torchgraft.train.strict_json.dumps_strict`, as the CLI does."""
        sqnr = self.report.sqnr.values() if self.report else ()
        return {
            "ok": self.ok,
            "order": self.order,
            "matches": self.matches,
            "problems": [p.to_dict() for p in self.problems],
            "allowed": [p.to_dict() for p in self.allowed],
            "sqnr_db": [dataclasses.asdict(s) for s in sqnr],
        }

    def __str__(self) -> str:
        lines = [f"order: {' -> '.join(self.order) or '(empty plan)'}"]
        if self.report is not None:
            lines += ["", str(dataclasses.replace(self.report, problems=[]))]
        lines += ["", format_problems(self.problems)]
        if self.allowed:
            lines += ["", "allowed by the plan: " + format_problems(self.allowed)]
        return "\n".join(lines)


def table(rows: list[list[str]]) -> str:
    """Left-aligned text columns (the first two), right-aligned numbers (the rest)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    )


def _sqnr_cells(s: HandlerSqnr, calibrated: bool) -> list[str]:
    """The SQNR columns of one handler; with ``calibrated``, also its declared tolerance,
    calibrated SQNR, worst per-op SQNR and per-op tolerance (blank where not calibrated)."""
    cells = [_db(s.step_db), _db(s.alone_db), _db(s.total_db), _tolerance(s.tolerance_db)]
    if calibrated:
        cells += [_tolerance(s.declared_db), _db(s.calibrated_db), _db(s.op_db)]
        cells.append(_tolerance(s.op_tolerance_db))
    return cells


def _tolerance(value: float | None) -> str:
    return "none" if value == -math.inf else _db(value)


def _db(value: float | None) -> str:
    if value is None:
        return ""
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f}"
