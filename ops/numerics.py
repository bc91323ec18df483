"""Numerical comparison metrics shared by the ops, the verify stage and the tests."""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr"]


def sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB.

    ``20 * log10(||ref|| / ||x - ref||)`` with both norms computed in float64 over all
    elements. Returns ``inf`` when ``x`` equals ``ref`` exactly and ``-inf`` when ``ref`` is
    all zeros but ``x`` is not.

    Raises:
        ValueError: if the shapes differ (no silent broadcasting).
    """
    if x.shape != ref.shape:
        raise ValueError(f"sqnr: shape mismatch {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    ref64 = ref.detach().to(torch.float64)
    noise = torch.linalg.vector_norm(
        x.detach().to(device=ref64.device, dtype=torch.float64) - ref64
    )
    signal = torch.linalg.vector_norm(ref64)
    if noise.item() == 0.0:
        return math.inf
    if signal.item() == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal.item() / noise.item())
