"""Custom ops for low-precision linear layers, in the ``torchgraft`` op namespace.

Importing this package registers, each with a fake implementation and an autograd formula
whose backward is itself made of custom ops (so it survives ``torch.export`` and
``torch.compile``):

* ``torchgraft::float8_linear(x, w, bias, recipe, gemm)`` (:mod:`.float8`)
* ``torchgraft::int8_linear(x, w, bias, mode, int8_forward, int8_grad_input,
  int8_grad_weight, gemm)`` (:mod:`.int8`)
* ``torchgraft::mx_linear(x, w, bias, fmt)`` (:mod:`.mx`)
* ``torchgraft::bitnet_linear(x, w, bias, gemm)`` (:mod:`.bitnet`)
* ``torchgraft::onednn_mm(a, b, bias=None)`` (:mod:`.onednn`): a float32 ``mm`` / ``addmm`` on oneDNN, for
  Inductor's post-grad graphs (no autograd formula)

and their ``*_grad_input`` / ``*_grad_weight`` backward ops. Each forward op is a drop-in
for ``F.linear(x, w, bias)``. Shared pieces: :mod:`.quant` (quantization primitives),
:mod:`.linear` (op plumbing), :mod:`.numerics` (``sqnr``), :mod:`.kernels` (the ``gemm``
argument: native or emulated GEMMs, ``"auto"`` probed once per device).
"""

from .bitnet import bitnet_linear
from .float8 import (
    cached_float8_weight_scale,
    clear_float8_weight_scales,
    float8_linear,
    precompute_float8_weight_scales,
)
from .int8 import int8_linear
from .mx import mx_linear
from .numerics import sqnr
from .onednn import onednn_mm

__all__ = [
    "bitnet_linear",
    "cached_float8_weight_scale",
    "clear_float8_weight_scales",
    "float8_linear",
    "int8_linear",
    "mx_linear",
    "onednn_mm",
    "precompute_float8_weight_scales",
    "sqnr",
]
from . import sharding  # noqa: E402, F401  (DTensor support for every torchgraft:: op)
