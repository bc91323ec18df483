"""Passes: the pass manager, its report, and (later) ordering, checks and verification."""

from torchgraft.passes.manager import PassManager
from torchgraft.passes.report import Report

__all__ = ["PassManager", "Report"]
