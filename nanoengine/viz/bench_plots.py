"""Figures from recorded ``nanoengine bench`` results (JSON written with ``--result-json``)."""

from __future__ import annotations

from matplotlib.figure import Figure

_LABELS = {"recompute": "recompute everything (lesson 01)", "contiguous": "KV cache (lesson 02)"}


def kv_cache_speed(results: list[dict]) -> Figure:
    """Per-step decode time along the sequence, and decode tokens/s (median, min–max bars)."""
    fig = Figure(figsize=(11, 4.2))
    steps, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in results:
        positions = range(r["input_len"] + 1, r["input_len"] + 1 + len(r["decode_step_ms"]))
        steps.plot(list(positions), r["decode_step_ms"], label=_LABELS.get(r["engine"], r["engine"]), lw=1.2)
    steps.set_xlabel("sequence length at the step (tokens)")
    steps.set_ylabel("time of the decode step (ms, median)")
    steps.set_ylim(bottom=0)
    steps.legend(fontsize=9)
    names = [_LABELS.get(r["engine"], r["engine"]).split(" (")[0] for r in results]
    med = [r["decode_tokens_per_s"]["median"] for r in results]
    err = [[m - r["decode_tokens_per_s"]["min"] for m, r in zip(med, results)],
           [r["decode_tokens_per_s"]["max"] - m for m, r in zip(med, results)]]
    speed.bar(names, med, yerr=err, capsize=6, color=["#999999", "#DD8452"][: len(results)])
    for i, m in enumerate(med):
        speed.text(i + 0.1, m, f"{m:.1f}", ha="left", va="bottom", fontsize=10)
    speed.set_ylabel("decode tokens/s (median of runs)")
    if results:
        r = results[0]
        speed.set_title(f"{r['output_len']} generated tokens, {r['model']}, {r['dtype']}", fontsize=10)
        fig.suptitle(f"Measured {r['date']} on {r['machine']}", fontsize=9)
    fig.subplots_adjust(wspace=0.3, top=0.85)
    return fig
