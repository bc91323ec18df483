"""Passes: the pass manager, the order of a plan, its checks, verification and results."""

from torchgraft.passes.manager import PassManager, op_histogram
from torchgraft.passes.plan import HandlerEntry
from torchgraft.passes.problems import CheckError, Problem, format_problems
from torchgraft.passes.report import CheckResult, Report
from torchgraft.passes.verify import HandlerSqnr

__all__ = [
    "CheckError",
    "CheckResult",
    "HandlerEntry",
    "HandlerSqnr",
    "PassManager",
    "Problem",
    "Report",
    "format_problems",
    "op_histogram",
]
