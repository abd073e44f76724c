"""Summaries of repeated measurements: medians with min and max, as docs/benchmarks.md reports."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def format_summary(name: str, values: Sequence[float], unit: str) -> str:
    s = summary(values)
    return f"{name}: {s['median']:.2f} {unit} (min {s['min']:.2f}, max {s['max']:.2f}, n={len(values)})"
