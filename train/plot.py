"""Loss curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# Distinct at a glance even where the curves coincide: the reference is drawn wide and
# pale underneath, the others thin and dark on top.
_REFERENCE_STYLE = {"color": "#9ecae1", "linewidth": 4.0, "zorder": 1}
_CURVE_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _finite(values: Sequence[float]) -> list[float]:
    return [x if math.isfinite(x) else math.nan for x in values]


def plot_losses(
    curves: Mapping[str, Sequence[float]], path: str | Path, *, reference: str | None = None
) -> Path:
    """Plot each named loss curve against its step; skipped (nan) steps leave gaps.

    With ``reference`` (the name of one curve, e.g. the unconverted baseline), that curve
    is drawn wide and pale under the others, and a second panel shows each other curve
    minus it per step, so a conversion that tracks the baseline closely stays visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if reference is not None and reference not in curves:
        raise ValueError(f"reference curve {reference!r} is not among {list(curves)}")
    panels = 2 if reference is not None and len(curves) > 1 else 1
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(7, 4 + 2 * (panels - 1)),
        dpi=120,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [2, 1][:panels]},
    )
    ax = axes[0][0]
    others = [name for name in curves if name != reference]
    if reference is not None:
        losses = curves[reference]
        ax.plot(range(1, len(losses) + 1), _finite(losses), label=reference, **_REFERENCE_STYLE)
    for name, color in zip(others, itertools.cycle(_CURVE_COLORS)):
        losses = curves[name]
        ax.plot(range(1, len(losses) + 1), _finite(losses), label=name, color=color, zorder=2)
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        diff_ax = axes[1][0]
        base = _finite(curves[reference])
        for name, color in zip(others, itertools.cycle(_CURVE_COLORS)):
            diff = [a - b for a, b in zip(_finite(curves[name]), base)]
            diff_ax.plot(range(1, len(diff) + 1), diff, color=color, label=f"{name} − {reference}")
        diff_ax.axhline(0.0, color="gray", linewidth=0.8)
        diff_ax.set_ylabel(f"loss − {reference}")
        diff_ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
