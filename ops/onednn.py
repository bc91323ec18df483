"""``torchgraft::onednn_mm``: a float32 matrix product on oneDNN instead of the BLAS library.

``aten.mm`` on CPU calls the BLAS torch was built with (MKL in the PyPI wheels). On the AMD
EPYC (Zen 4) this project is measured on, MKL's float32 GEMM runs about half as fast as
oneDNN's, which torch also ships (``torch.ops.mkldnn._linear_pointwise``); Inductor calls
``aten.mm`` for every GEMM of a training step and uses oneDNN only for frozen inference
weights. This op is ``a @ b`` in float32 through oneDNN: same precision, another summation
order (about 130 dB SQNR against MKL's). It is what the ``onednn_matmul`` handler puts into
Inductor's post-grad graphs, below autograd, so it has no autograd formula.
"""

from __future__ import annotations

import torch

__all__ = ["onednn_available", "onednn_mm"]


def onednn_available() -> bool:
    """Whether this torch build has oneDNN (``torch.backends.mkldnn``) for CPU tensors."""
    return torch.backends.mkldnn.is_available()


@torch.library.custom_op("torchgraft::onednn_mm", mutates_args=())
def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (plus ``bias [N]``, as ``aten.addmm(bias, a, b)``) for 2-D float32 CPU
    tensors ``a [M, K]`` and ``b [K, N]``, on oneDNN."""
    _check_operands(a, b, bias)
    return torch.ops.mkldnn._linear_pointwise.default(a, b.t(), bias, "none", [None], "")


@onednn_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_operands(a, b, bias)
    return a.new_empty((a.shape[0], b.shape[1]))


def _check_operands(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``a [M, K]``, ``b [K, N]`` and ``bias [N]`` (if given) are
    float32 CPU tensors."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"torchgraft::onednn_mm multiplies [M, K] by [K, N]; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(
            f"torchgraft::onednn_mm adds a bias of [N] = [{b.shape[1]}]; got {tuple(bias.shape)}"
        )
    operands = (a, b) if bias is None else (a, b, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in operands):
        found = ", ".join(f"{t.dtype} on {t.device}" for t in operands)
        raise ValueError(f"torchgraft::onednn_mm takes float32 CPU tensors; got {found}")
