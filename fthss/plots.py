"""Figures for reports: matplotlib without a display, each saved atomically as a PNG."""

from __future__ import annotations

import io
from pathlib import Path

from fthss.atomic import atomic_write_bytes


def subplots(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
