"""The ``kernel`` option of the handlers whose ops have a native low-precision GEMM."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["KernelOption"]


@dataclasses.dataclass(kw_only=True)
class KernelOption:
    """Mixed into a handler's ``Options`` (float8, int8, BitNet)."""

    kernel: Literal["auto", "native", "emulated"] = "auto"
    """GEMM implementation: "native" runs torch._scaled_mm / torch._int_mm on the quantized
    operands; "emulated" multiplies the same quantized values in float32 with the ordinary
    GEMM (identical quantization, > 100 dB agreement); "auto" takes native only where a
    one-time probe on the device finds it fast, e.g. not on CPUs whose float8 matmul is a
    reference loop (the environment variable TORCHGRAFT_KERNEL overrides "auto")."""
