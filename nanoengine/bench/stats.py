"""Summaries of repeated measurements: medians with min and max, as docs/benchmarks.md reports,
and percentiles over requests, as vLLM's benchmarks report them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def format_summary(name: str, values: Sequence[float], unit: str) -> str:
    s = summary(values)
    return f"{name}: {s['median']:.2f} {unit} (min {s['min']:.2f}, max {s['max']:.2f}, n={len(values)})"


def percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
    """``{"p50": ...}`` for each percentile in ``qs``, interpolated linearly between ranks as
    ``numpy.percentile`` (and so vLLM) does; all 0.0 for no values (a run where nothing streamed)."""
    if not len(values):
        return {f"p{q}": 0.0 for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs))}
