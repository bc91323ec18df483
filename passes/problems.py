"""Problems: what the checks find, each naming its handler(s), rule, node and source line."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, get_args

from torchgraft.handlers.options import OptionError
from torchgraft.ir.errors import RewriteError, TorchgraftError

ProblemKind = Literal[
    "unknown_handler",
    "bad_option",
    "duplicate",
    "missing_requirement",
    "cycle",
    "overlap",
    "order",
    "no_match",
    "clobber",
    "numerics",
    "unmatched_filter",
    "rewrite_error",
    "expect",
]
"""Every kind of problem, in the order the checks report them:

* ``unknown_handler``: a plan names a handler nobody registered (with a did-you-mean).
* ``bad_option``: an option the handler does not have, or a value of the wrong type.
* ``duplicate``: the same handler twice in one plan.
* ``missing_requirement``: a handler ``requires`` one that is not in the plan.
* ``cycle``: ``requires`` / ``after`` / ``before`` declarations that contradict each other.
* ``overlap``: rules of two handlers with no declared order match the same node.
* ``order``: a handler's rule would rewrite nodes that a later handler creates.
* ``no_match``: a handler rewrote nothing and is not marked ``optional``.
* ``clobber``: a handler rewrote nodes an earlier one created, without declaring ``after``.
* ``numerics``: the verify stage measured an SQNR below the handler's tolerance.
* ``unmatched_filter``: a module FQN glob of a handler (``skip_fqns``, a rule's
  ``include`` / ``exclude``) matches no module of the graph (with a did-you-mean).
* ``rewrite_error``: a replacement raised during the dry run.
* ``expect``: the run differs from the expectation file of ``torchgraft check --expect``.
"""


UNACCEPTABLE_KINDS = frozenset(
    {
        "unknown_handler",
        "bad_option",
        "duplicate",
        "missing_requirement",
        "cycle",
        "rewrite_error",
        "expect",
    }
)
"""Kinds no plan can accept: the plan cannot be built, ordered or applied, or (``expect``)
the check was asked to compare with a file."""


def acceptable_kinds() -> tuple[str, ...]:
    """The kinds a plan may accept with ``allow=[...]``: every :data:`ProblemKind` found on a
    graph that can still be rewritten (``overlap``, ``order``, ``no_match``, ``clobber``,
    ``numerics`` ...)."""
    return tuple(kind for kind in get_args(ProblemKind) if kind not in UNACCEPTABLE_KINDS)


def allowed_kinds(allow: Sequence[str]) -> frozenset[str]:
    """Validate a plan's ``allow`` list; raises :class:`TorchgraftError` naming a kind that
    is unknown or cannot be accepted."""
    if isinstance(allow, str):
        allow = [allow]
    acceptable = acceptable_kinds()
    for kind in allow:
        if kind not in acceptable:
            why = "cannot be allowed" if kind in UNACCEPTABLE_KINDS else "is not a problem kind"
            raise TorchgraftError(
                f"allow: {kind!r} {why}; a plan may allow {', '.join(acceptable)}"
            )
    return frozenset(allow)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan, as ``torchgraft check --json`` reports it."""

    kind: ProblemKind
    handlers: tuple[str, ...]
    """The handlers involved; for two-handler problems the one that runs (or is listed) first."""
    rule: str | None
    """The rule involved; for two rules (``overlap``), both, ``"a_rule / b_rule"``."""
    node: str | None
    """The graph node the problem was seen at."""
    source: str | None
    """The user's source line (``file:line: code``) or the config location (``file:line:col``)."""
    message: str

    def to_dict(self) -> dict:
        """The JSON form: the six fields, ``handlers`` as a list."""
        return {**dataclasses.asdict(self), "handlers": list(self.handlers)}

    def __str__(self) -> str:
        head = f"[{self.kind}] {', '.join(self.handlers) or '(plan)'}"
        where = []
        if self.rule:
            where.append(f"rule {self.rule}")
        if self.node:
            where.append(f"node '{self.node}'")
        if where:
            head += f" ({', '.join(where)})"
        lines = [head, f"    {self.message}"]
        if self.source:
            lines.append(f"    at {self.source}")
        return "\n".join(lines)


def error_problem(
    exc: Exception, handler: str = "", rule: str | None = None, when: str = ""
) -> Problem:
    """The problem of an exception raised while handler ``handler`` matched or rewrote:
    ``bad_option`` for an option the graph refuses, else ``rewrite_error``."""
    if isinstance(exc, OptionError):
        return Problem("bad_option", (exc.handler,), rule, None, None, str(exc))
    if isinstance(exc, RewriteError):
        return Problem(
            "rewrite_error", (exc.handler or handler,), exc.rule, exc.node, exc.source, str(exc)
        )
    message = f"handler '{handler}' rule '{rule}' raised {type(exc).__name__}: {exc} {when}"
    return Problem("rewrite_error", (handler,), rule, None, None, message)


def format_problems(problems: Sequence[Problem]) -> str:
    """A readable block per problem, numbered."""
    if not problems:
        return "no problems"
    noun = "problem" if len(problems) == 1 else "problems"
    blocks = [f"{len(problems)} {noun}:"]
    blocks.extend(f"{i}. {problem}" for i, problem in enumerate(problems, 1))
    return "\n".join(blocks)


class CheckError(TorchgraftError):
    """A plan cannot run (unknown handler, bad option, cycle ...) or has problems the checks
    found and it does not allow (``overlap``, ``no_match``, ``numerics`` ...); the graph is
    unchanged. ``problems`` lists what was found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        message = format_problems(problems)
        kinds = sorted({p.kind for p in problems})
        if kinds and all(kind in acceptable_kinds() for kind in kinds):
            message += (
                f"\nTo accept them, fix the plan or declare it: allow: [{', '.join(kinds)}] in the "
                "config (PassManager(..., allow=[...])), or optional: true on a handler that may "
                "match nothing"
            )
        super().__init__(message)
        self.problems = list(problems)
