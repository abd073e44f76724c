"""Lesson 03's payoff in one picture: how much of the KV memory each allocator wastes.

The input is a lesson-03 memory result: one KV budget, filled once by reserving every
request's longest possible length (contiguous) and once a block at a time (paged). For
each: ``requests_fit`` (admitted at once), ``reserved_tokens`` (slots held),
``used_tokens`` (tokens actually stored) and ``waste_share`` (1 - used / reserved).
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nanoengine.viz.style import COLORS

_SCHEMES = ("contiguous", "paged")
_LABELS = {"contiguous": "contiguous\n(reserved up front)", "paged": "paged\n(a block at a time)"}


def paged_vs_contiguous(result: dict) -> Figure:
    """Left: requests that fit in the budget at once. Right: memory reserved vs used, waste in %."""
    fig = Figure(figsize=(11, 4.2))
    fit, memory = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = [COLORS[s] for s in _SCHEMES]

    counts = [result[s]["requests_fit"] for s in _SCHEMES]
    fit.bar([_LABELS[s] for s in _SCHEMES], counts, color=colors, width=0.6)
    fit.text(0, counts[0], f"{counts[0]}", ha="center", va="bottom", fontsize=11, weight="bold")
    gain = f" ({counts[1] / counts[0]:.1f}×)" if counts[0] else ""
    fit.text(1, counts[1], f"{counts[1]}{gain}", ha="center", va="bottom", fontsize=11, weight="bold")
    fit.set_ylim(0, max(counts) * 1.15)
    fit.set_ylabel("requests admitted at once")
    fit.set_title(f"requests that fit in the KV budget ({result['num_requests_offered']} offered)", fontsize=10)

    unit, scale = ("GiB", 2**30) if result["budget_bytes"] >= 2**30 else ("MiB", 2**20)
    per_token = result["bytes_per_token"] / scale
    used = [result[s]["used_tokens"] * per_token for s in _SCHEMES]
    wasted = [(result[s]["reserved_tokens"] - result[s]["used_tokens"]) * per_token for s in _SCHEMES]
    memory.barh(_SCHEMES, used, color=colors, height=0.55)
    memory.barh(_SCHEMES, wasted, left=used, color="white", edgecolor=colors, hatch="///", height=0.55)
    budget = result["budget_bytes"] / scale
    for i, s in enumerate(_SCHEMES):  # labels right of the budget line, so it never strikes through them
        memory.text(max(used[i] + wasted[i], budget), i, f"  {100 * result[s]['waste_share']:.1f}% wasted",
                    va="center", fontsize=10, weight="bold")
    memory.axvline(budget, color="gray", ls="--", lw=1)
    memory.text(budget, -0.4, f" budget {budget:.3g} {unit}", ha="left", va="center", fontsize=8, color="gray")
    memory.set_xlim(0, budget * 1.4)
    memory.set_ylim(-0.5, 1.6)
    memory.invert_yaxis()
    memory.set_xlabel(f"KV memory ({unit})")
    memory.set_title("memory reserved vs used", fontsize=10)
    memory.legend(handles=[Patch(fc="gray", label="used: tokens stored"),
                           Patch(fc="white", ec="gray", hatch="///", label="reserved, never written")],
                  loc="lower right", fontsize=8, framealpha=1, edgecolor="none")

    fig.suptitle(f"{result['model']}: {result['bytes_per_token']:,} bytes/token, {result['block_size']}-token blocks, "
                 f"requests up to {result['max_model_len']:,} tokens", fontsize=10)
    fig.subplots_adjust(wspace=0.3, top=0.85, bottom=0.12, left=0.07, right=0.97)
    return fig
