"""torchgraft: model conversions written as declarative graph rewrites.

Public API::

    import torchgraft as tg
    gm = tg.capture(model, (tokens,))
    report = tg.PassManager(["float8"]).run(gm)
    report.matches
"""

from torchgraft.handlers import Handler, get_handler, register_handler, registered
from torchgraft.ir.capture import capture
from torchgraft.ir.errors import CaptureError, RewriteError, RuleDefinitionError, TorchgraftError
from torchgraft.ir.matcher import explain, find_matches
from torchgraft.ir.rule import COMMUTATIVE, Match, Rule, rule
from torchgraft.passes import PassManager, Report

__all__ = [
    "COMMUTATIVE",
    "CaptureError",
    "Handler",
    "Match",
    "PassManager",
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
]
__version__ = "0.1.0"
