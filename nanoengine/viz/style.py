"""Shared look and deterministic saving of figures."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

COLORS = {"prompt": "#4C72B0", "new": "#DD8452", "cached": "#D9D9D9", "attn": "#55A868", "mlp": "#C44E52",
          "norm": "#8172B3", "embed": "#937860"}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG with no timestamp or version metadata, so reruns are byte-identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path
