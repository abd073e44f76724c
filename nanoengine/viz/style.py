"""Shared look and deterministic saving of figures."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

COLORS = {"prompt": "#4C72B0", "new": "#DD8452", "cached": "#D9D9D9", "attn": "#55A868", "mlp": "#C44E52",
          "norm": "#8172B3", "embed": "#937860", "contiguous": "#DD8452", "paged": "#4C72B0"}

# One colour per request (a qualitative palette); requests beyond ten reuse colours.
REQUEST_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3",
                   "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")


def request_colors(request_ids: Iterable[str | None]) -> dict[str, str]:
    """A colour per request id, assigned in sorted order so the same ids always get the same colours.

    ``None`` entries are ignored. Built from every id of a whole trace
    (``nanoengine.viz.block_pool.trace_colors``), a request keeps its colour across snapshots.
    """
    ids = sorted({r for r in request_ids if r is not None})
    return {r: REQUEST_PALETTE[i % len(REQUEST_PALETTE)] for i, r in enumerate(ids)}


def pale(color: str, strength: float) -> tuple[float, float, float]:
    """``color`` washed towards white: ``strength`` 1 keeps it, 0 is white."""
    return tuple(1 - strength * (1 - c) for c in to_rgb(color))


def figure_png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes with no timestamp or version metadata, so reruns are byte-identical."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a deterministic PNG (see :func:`figure_png`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))
    return path
