"""``float8``: float8 training linears (``torchgraft::float8_linear``), as graph rules.

Every eligible linear layer (any form of :mod:`~torchgraft.handlers.linear_rules`; both
weight dims multiples of 16; not the head, not in ``skip_fqns``) becomes ``torchgraft::float8_linear(x, w, b, recipe)``: forward and both backward GEMMs in
float8 (e4m3, e5m2 for the output gradient with ``"tensorwise"``), see
:mod:`torchgraft.ops.float8`. Ineligible linears stay as they are and are listed by
:meth:`~torchgraft.handlers.linear_rules.LinearHandler.skipped`.

Example::

    gm = tg.capture(model, (tokens, labels))
    handler = Float8(recipe="tensorwise")
    tg.PassManager([handler]).run(gm)     # report.matches == {"float8": <eligible linears>}
    handler.skipped(gm)                   # [Skipped(..., reason="... multiples of 16 ...")]
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch
from torch import fx, nn

import torchgraft as tg
from torchgraft.handlers.kernel_option import KernelOption
from torchgraft.handlers.linear_rules import LinearHandler
from torchgraft.ir.provenance import META_KEY
from torchgraft.ops.float8 import precompute_float8_weight_scales

__all__ = ["Float8"]

_FLOAT8_LINEAR = torch.ops.torchgraft.float8_linear.default
_TRANSPOSE = torch.ops.aten.t.default
_MULTIPLE = 16


@tg.register_handler("float8")
class Float8(LinearHandler):
    """float8 training for linears whose weight dims are multiples of 16.

    ``post_optimizer_hook`` precomputes the tensorwise e4m3 scale of every weight this
    handler rewrote, once per optimizer step, with
    :func:`~torchgraft.ops.float8.precompute_float8_weight_scales`; the next forward and
    grad-input GEMMs reuse it instead of taking ``amax(|W|)`` per call. This is an exact
    equivalence: the cached scale is computed by the same function from the same weight, and
    is only used while the weight is unchanged (same object, ``_version``, storage, shape),
    so losses and gradients are bit-identical with and without the hook.
    """

    sqnr_tolerance = 12.0
    """Whole-model verify: the worst output/gradient SQNR measured on the tiny Llama was
    16.7 dB tensorwise, 19.1 dB rowwise (12 random models and input shapes)."""

    op_sqnr_tolerance = 15.0
    """Per linear, replacement against ``F.linear`` on the same inputs (forward, and the
    gradients with the real cotangent): measured 23.1-24.4 dB tensorwise, 27.3-27.9 dB
    rowwise (6 transformers architectures, 3 inputs each); a wrong scale reads about 0 dB."""

    @dataclasses.dataclass(kw_only=True)
    class Options(LinearHandler.Options, KernelOption):
        recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
        """``"tensorwise"``: one scale per tensor, e4m3 for activations and weights, e5m2
        for the output gradient. ``"rowwise"``: one power-of-two scale per row along each
        GEMM's contraction dim, e4m3 everywhere (more accurate with outliers)."""

    def shape_failure(self, w: torch.Tensor) -> str | None:
        n, k = w.shape
        if n % _MULTIPLE or k % _MULTIPLE:
            return (
                f"float8 needs both weight dims to be multiples of {_MULTIPLE}, "
                f"weight is [{n}, {k}] (out_features x in_features)"
            )
        return None

    def quantized_linear(self, x, w, b):
        return _FLOAT8_LINEAR(x, w, b, self.options.recipe, self.options.kernel)

    def post_optimizer_hook(self, model_parts: list[nn.Module]) -> None:
        """Precompute the tensorwise scales of the rewritten weights (an exact equivalence)."""
        precompute_float8_weight_scales(w for part in model_parts for w in self.weights(part))

    def weights(self, module: nn.Module) -> list[torch.Tensor]:
        """The weights of the tensorwise float8 linears this handler created in ``module``
        (a converted graph module, or ``torch.compile`` of one), ``[in, out]`` parameters
        included (their op takes ``aten.t(w)``); ``[]`` for other modules."""
        gm = getattr(module, "_orig_mod", module)
        if not isinstance(gm, fx.GraphModule):
            return []
        weights: dict[str, torch.Tensor] = {}
        for node in gm.graph.find_nodes(op="call_function", target=_FLOAT8_LINEAR):
            if node.meta.get(META_KEY, {}).get("handler") != self.display_name:
                continue  # created by another handler (provenance in node.meta)
            w, recipe = node.args[1], node.args[3]
            if isinstance(w, fx.Node) and w.target is _TRANSPOSE:
                w = w.args[0]  # an [in, out] weight (the op caches by the parameter)
            if recipe == "tensorwise" and isinstance(w, fx.Node) and w.op == "get_attr":
                weights.setdefault(w.target, operator.attrgetter(w.target)(gm))
        return list(weights.values())
