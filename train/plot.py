"""Loss curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_losses(curves: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Plot each named loss curve against its step; skipped (nan) steps leave gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, losses in curves.items():
        ax.plot(
            range(1, len(losses) + 1),
            [x if math.isfinite(x) else math.nan for x in losses],
            label=label,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
