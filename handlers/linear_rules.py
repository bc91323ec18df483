"""What the low-precision linear handlers (float8, int8, MX, BitNet) share.

:class:`LinearHandler` declares the two rules, ``aten.linear(x, w)`` and
``aten.linear(x, w, b)``, each replaced by the subclass's
:meth:`~LinearHandler.quantized_linear` (one custom op call), and the ``skip_fqns`` option
and the shape eligibility, both applied in :meth:`~LinearHandler.reject` so that
``tg.explain`` states why a linear was left alone. :meth:`~LinearHandler.skipped` lists
every linear the handler leaves alone, with that same reason. A subclass only writes its options, its shape requirement and its op::

    @tg.register_handler("mx")
    class MX(LinearHandler):
        @dataclasses.dataclass(kw_only=True)
        class Options(LinearHandler.Options):
            format: Literal["mxfp8", "mxfp4"] = "mxfp8"
            '''Element format.'''

        def shape_failure(self, w):
            return None if w.shape[1] % 32 == 0 else f"K={w.shape[1]} ..."

        def quantized_linear(self, x, w, b):
            return torch.ops.torchgraft.mx_linear.default(x, w, b, self.options.format)

Because the float8, int8, MX and BitNet handlers share these rules, any two of them in one
plan match the same nodes, which the pass manager's ``overlap`` check reports, unless their
``skip_fqns`` make them claim disjoint modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import torchgraft.ops  # noqa: F401  (registers the torchgraft::*_linear ops)
from torchgraft.handlers.base import Handler
from torchgraft.ir.provenance import module_glob
from torchgraft.ir.rule import Match, rule

__all__ = ["LinearHandler"]

aten = torch.ops.aten


class LinearHandler(Handler):
    """Base of the handlers that rewrite ``aten.linear`` into one low-precision custom op.

    Subclasses override :meth:`quantized_linear` and, when the format constrains shapes,
    :meth:`shape_failure`; they are registered, this base is not.
    """

    @dataclasses.dataclass(kw_only=True)
    class Options:
        skip_fqns: list[str] = dataclasses.field(default_factory=lambda: ["output"])
        """Module FQN globs to leave in high precision. A glob matches a dotted sub-path of
        the FQN (see :func:`torchgraft.ir.provenance.module_glob`): ``"attention"`` skips every linear inside an
        ``attention`` module; the default ``["output"]`` keeps the final projection
        (``output`` or ``model.output``) unconverted, as float8 training recipes do."""

    @rule
    def linear(x: torch.Tensor, w: torch.Tensor):  # linear(x, w) -> <fmt>_linear(x, w, None)
        return aten.linear.default(x, w)

    @linear.replacement
    def _(self, x, w):
        return self.quantized_linear(x, w, None)

    @rule
    def linear_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):  # -> <fmt>_linear(x, w, b)
        return aten.linear.default(x, w, b)

    @linear_bias.replacement
    def _(self, x, w, b):
        return self.quantized_linear(x, w, b)

    def quantized_linear(self, x: Any, w: Any, b: Any | None) -> Any:
        """The replacement of ``F.linear(x, w, b)``: one custom op call on the traced values
        (``b`` is None for the bias-free rule)."""
        raise NotImplementedError(f"{type(self).__name__} must define quantized_linear(x, w, b)")

    def shape_failure(self, w: torch.Tensor) -> str | None:
        """Why the format cannot take weight ``w`` (a fake tensor ``[N, K]``), or None.
        Default: every shape is supported."""
        return None

    def reject(self, match: Match) -> str | None:
        """Skip modules matched by ``skip_fqns``, then weights :meth:`shape_failure` refuses
        (listed with their reasons by :meth:`~torchgraft.Handler.skipped`)."""
        glob = module_glob(match.module_fqn, self.options.skip_fqns)
        if glob is not None:
            return f"module '{match.module_fqn}' is in skip_fqns (glob {glob!r})"
        w = match["w"]
        return f"weight is {w.ndim}-D, expected [N, K]" if w.ndim != 2 else self.shape_failure(w)
