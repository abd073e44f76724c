"""Lesson 17: where one decode step's time goes, path by path (from ``profile_decode_steps``)."""

from __future__ import annotations

from matplotlib.figure import Figure

from nanoengine.bench.profile import CATEGORIES

CATEGORY_COLORS = {"fused": "#4C72B0", "matmul": "#DD8452", "attention": "#55A868", "kv write": "#8172B3",
                   "sampling": "#937860", "elementwise": "#C44E52", "Python/other": "#B0B0B0"}


def step_waterfall(runs: list[tuple[str, dict]], subtitle: str) -> Figure:
    """One bar per path (``(label, report)``, the first on top), split into the profile's
    categories in milliseconds per step; segments wide enough to read are labelled, and each
    bar ends with its total. A report is what ``BenchProfiler.report`` returns."""
    per_step = [{row["category"]: row["ms_per_step"] for row in report["categories"]} for _, report in runs]
    totals = [sum(ms.values()) for ms in per_step]
    fig = Figure(figsize=(10.5, 1.2 + 0.75 * len(runs)))
    ax = fig.add_subplot(1, 1, 1)
    rows = list(range(len(runs)))[::-1]
    lefts = [0.0] * len(runs)  # where each bar's next segment starts
    for category in CATEGORIES:
        widths = [max(ms.get(category, 0.0), 0.0) for ms in per_step]
        ax.barh(rows, widths, left=lefts, height=0.6, color=CATEGORY_COLORS[category], label=category)
        for row, left, width in zip(rows, lefts, widths):
            if width >= 0.06 * max(totals):
                ax.text(left + width / 2, row, f"{width:.1f}", ha="center", va="center", fontsize=8.5, color="white")
        lefts = [left + width for left, width in zip(lefts, widths)]
    for row, total in zip(rows, totals):
        ax.annotate(f"{total:.1f} ms", (total, row), xytext=(5, 0), textcoords="offset points", va="center",
                    fontsize=9.5)
    ax.set_yticks(rows, [label for label, _ in runs])
    ax.set_xlim(0, max(totals) * 1.15)
    ax.set_xlabel("milliseconds per decode step, by profiler category (torch.profiler self times)")
    ax.legend(ncols=len(CATEGORIES), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle(subtitle, fontsize=9, y=0.99)
    fig.subplots_adjust(left=0.25, right=0.95, top=1 - 0.75 / fig.get_figheight(), bottom=0.55 / fig.get_figheight())
    return fig
