"""``onednn_matmul``: the compiled step's float32 GEMMs on oneDNN (compile stage).

Inside ``torch.compile`` Inductor keeps every ``aten.mm`` of the forward and backward
graphs as a call to the BLAS library torch was built with (MKL in the PyPI wheels); it
uses oneDNN only for the frozen weights of inference. On the AMD EPYC this project is
measured on, oneDNN's float32 GEMM is about twice as fast as MKL's at the debug Llama's
shapes, so this handler rewrites each float32 CPU ``aten.mm`` of Inductor's post-grad
graphs into ``torchgraft::onednn_mm`` (:mod:`torchgraft.ops.onednn`): the same product in
float32, in another summation order. ``benchmarks/compile_onednn_matmul.py`` measures it
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
    """Both operands are float32 CPU tensors and this torch has oneDNN."""
    operands = (m["a"], m["b"])
    return onednn_available() and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        for t in operands
    )


@tg.register_handler("onednn_matmul")
class OnednnMatmul(tg.Handler):
    """Float32 ``aten.mm`` of the compiled forward and backward on oneDNN instead of BLAS."""

    stage = "compile"

    @tg.rule(where=_float32_on_cpu)
    def mm(a: torch.Tensor, b: torch.Tensor):  # mm(a, b) -> onednn_mm(a, b)
        return aten.mm.default(a, b)

    @mm.replacement
    def _(a, b):
        return _ONEDNN_MM(a, b)
