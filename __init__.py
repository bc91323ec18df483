"""torchgraft: model conversions written as declarative graph rewrites.

Public API::

    import torchgraft as tg
    gm = tg.capture(model, (tokens,))
    report = tg.PassManager(["float8"]).run(gm)
    report.matches
"""

import importlib

from torchgraft.handlers import Handler, get_handler, register_handler, registered
from torchgraft.ir.capture import capture
from torchgraft.ir.errors import CaptureError, RewriteError, RuleDefinitionError, TorchgraftError
from torchgraft.ir.leaf import leaf
from torchgraft.ir.matcher import explain, find_matches
from torchgraft.ir.rule import COMMUTATIVE, Match, Rule, rule
from torchgraft.ir.state import new_buffer, new_constant, new_parameter, value_of
from torchgraft.passes import CheckError, CheckResult, HandlerEntry, PassManager, Problem, Report

__all__ = [
    "COMMUTATIVE",
    "CaptureError",
    "CheckError",
    "CheckResult",
    "Handler",
    "HandlerEntry",
    "Match",
    "PassManager",
    "Problem",
    "Report",
    "RewriteError",
    "Rule",
    "RuleDefinitionError",
    "TorchgraftError",
    "capture",
    "explain",
    "find_matches",
    "get_handler",
    "register_handler",
    "registered",
    "rule",
    "testing",
    "leaf",
    "new_buffer",
    "new_constant",
    "new_parameter",
    "value_of",
]
__version__ = "0.1.0"

_LAZY_MODULES = ("config", "testing")
"""Submodules imported on first use (they pull in the training package)."""


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"torchgraft.{name}")
    raise AttributeError(f"module 'torchgraft' has no attribute {name!r}")
