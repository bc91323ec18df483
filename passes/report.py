"""The result of running a plan: matches per handler and rule, what each match did, timings."""

from __future__ import annotations

import dataclasses

from torchgraft.ir.rewriter import MatchRecord


@dataclasses.dataclass
class Report:
    """What :meth:`PassManager.run` did to a graph."""

    order: list[str]
    """Handler names in the order they ran."""
    rule_matches: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Handler → rule → number of matches rewritten."""
    records: list[MatchRecord] = dataclasses.field(default_factory=list)
    """One record per rewritten match, in application order."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Handler → seconds spent matching and rewriting (``"recompile"`` for the final one)."""

    @property
    def matches(self) -> dict[str, int]:
        """Handler name → number of rewrites applied, in run order."""
        return {name: sum(self.rule_matches.get(name, {}).values()) for name in self.order}

    def __str__(self) -> str:
        rows = [("handler", "rule", "matches", "ms")]
        for name in self.order:
            rules = self.rule_matches.get(name, {})
            rows.append(
                (name, "", str(sum(rules.values())), f"{1e3 * self.seconds.get(name, 0.0):.1f}")
            )
            rows.extend(("", rule, str(count), "") for rule, count in rules.items())
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
            for row in rows
        )
