"""``onednn_matmul``: the compiled step's float32 GEMMs on oneDNN (compile stage).

Inside ``torch.compile`` Inductor keeps every ``aten.mm`` of the forward and backward
graphs as a call to the BLAS library torch was built with (MKL in the PyPI wheels); it
uses oneDNN only for the frozen weights of inference. On the AMD EPYC this project is
measured on, oneDNN's float32 GEMM is about twice as fast as MKL's at the debug Llama's
shapes, so this handler rewrites each float32 CPU ``aten.mm`` of Inductor's post-grad
graphs into ``torchgraft::onednn_mm`` (:mod:`torchgraft.ops.onednn`): the same product in
float32, in another summation order. ``aten.addmm(bias, a, b)`` with its default scaling
and a bias per output column (a linear layer with a bias, e.g. GPT-2's ``Conv1D``) becomes
``onednn_mm(a, b, bias)``; other ``addmm``s (scaled, or accumulating a 2-D tensor) stay. ``benchmarks/compile_onednn_matmul.py`` measures it
against the unconverted compiled step, and shows the FX graph cache hit of a second run.

Whether it pays depends on the CPU and the BLAS build: on a CPU where MKL takes its fast
path (Intel), expect little. The rule leaves GEMMs that are not float32 on CPU alone.
"""

from __future__ import annotations

import torch

import torchgraft as tg
from torchgraft.ir.rule import Match
from torchgraft.ops.onednn import onednn_available

__all__ = ["OnednnMatmul"]

aten = torch.ops.aten
_ONEDNN_MM = torch.ops.torchgraft.onednn_mm.default


def _float32_on_cpu(m: Match) -> bool:
    """The operands (and a bias) are float32 CPU tensors and this torch has oneDNN."""
    operands = [m["a"], m["b"]] + ([m["bias"]] if "bias" in m.bindings else [])
    return onednn_available() and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        for t in operands
    )


def _bias_per_column(m: Match) -> bool:
    """``addmm``'s bias is one value per output column (``[N]``), as oneDNN adds it."""
    return _float32_on_cpu(m) and tuple(m["bias"].shape) == (m["b"].shape[1],)


@tg.register_handler("onednn_matmul")
class OnednnMatmul(tg.Handler):
    """Float32 ``aten.mm`` / ``aten.addmm`` of the compiled forward and backward on oneDNN
    instead of BLAS."""

    stage = "compile"

    @tg.rule(where=_float32_on_cpu)
    def mm(a: torch.Tensor, b: torch.Tensor):  # mm(a, b) -> onednn_mm(a, b)
        return aten.mm.default(a, b)

    @mm.replacement
    def _(a, b):
        return _ONEDNN_MM(a, b)

    @tg.rule(where=_bias_per_column)
    def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor):  # bias + a @ b
        return aten.addmm.default(bias, a, b)

    @addmm.replacement
    def _(bias, a, b):
        return _ONEDNN_MM(a, b, bias)
