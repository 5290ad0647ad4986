"""Plotting helpers every figure shares: matplotlib on the Agg backend, atomic PNGs, evenly spread ticks."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moetuner.atomic import atomic_path  # noqa: E402

MAX_PANELS = 4


def spread_layers(num: int, panels: int = MAX_PANELS) -> list[int]:
    """Up to `panels` layer indices spread evenly over range(num), first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, num - 1, min(panels, num))})


def save_figure(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    """Save `fig` as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)
