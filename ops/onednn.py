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
def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D float32 CPU tensors ``a [M, K]`` and ``b [K, N]``, on oneDNN."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"torchgraft::onednn_mm multiplies [M, K] by [K, N]; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.is_cuda or b.is_cuda:
        raise ValueError(
            f"torchgraft::onednn_mm takes float32 CPU tensors; got {a.dtype} on {a.device} "
            f"and {b.dtype} on {b.device}"
        )
    return torch.ops.mkldnn._linear_pointwise.default(a, b.t(), None, "none", [None], "")


@onednn_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))
