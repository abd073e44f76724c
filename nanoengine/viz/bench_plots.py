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


def _median_bars(ax, names: list[str], stats: list[dict], colors: list[str], fmt: str) -> None:
    """Bars at the medians with min–max whiskers, each labelled with its median."""
    med = [s["median"] for s in stats]
    err = [[m - s["min"] for m, s in zip(med, stats)], [s["max"] - m for m, s in zip(med, stats)]]
    ax.bar(names, med, yerr=err, capsize=6, color=colors, width=0.6)
    for i, (m, s) in enumerate(zip(med, stats)):
        ax.annotate(fmt.format(m), (i, s["max"]), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=10)
    ax.set_ylim(0, max(s["max"] for s in stats) * 1.2 or 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _workload(r: dict) -> str:
    spread = f" ±{100 * r['range_ratio']:.0f} %" if r.get("range_ratio") else ""
    return (f"{r['num_prompts']} requests, {r['input_len']}-token prompts and {r['output_len']}-token outputs{spread}, "
            f"max_num_seqs {r['max_num_seqs']}, {r['model']}, {r['dtype']}\nmeasured {r['date']} on {r['machine']}")


def batching_throughput(static: dict, continuous: dict) -> Figure:
    """Lesson 06's payoff: the same workload in static waves and with continuous batching.
    Output tokens/s, median TTFT and median TPOT (median of runs, min–max whiskers)."""
    fig = Figure(figsize=(11, 4.2))
    names, colors = ["static", "continuous"], ["#999999", "#4C72B0"]
    panels = (("output_tokens_per_s", "output tokens/s (higher is better)", "{:.1f}"),
              ("ttft_p50_s", "time to first token, p50 (s)", "{:.2f}"),
              ("tpot_p50_ms", "time per output token, p50 (ms)", "{:.0f}"))
    for i, (key, label, fmt) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        _median_bars(ax, names, [static[key], continuous[key]], colors, fmt)
        ax.set_title(label, fontsize=10)
    speedup = continuous["output_tokens_per_s"]["median"] / static["output_tokens_per_s"]["median"]
    fig.suptitle(f"Continuous batching: {speedup:.2f}× the output tokens/s of static batching\n"
                 f"{_workload(continuous)}", fontsize=9.5)
    fig.subplots_adjust(wspace=0.35, top=0.74, bottom=0.08, left=0.06, right=0.98)
    return fig


def chunk_size_tradeoff(results: list[dict]) -> Figure:
    """Lesson 07's measurement: time to first token, time per output token (medians over
    requests) and output tokens/s against the step's token budget (median of runs, min–max whiskers)."""
    results = sorted(results, key=lambda r: r["token_budget"])
    budgets = [r["token_budget"] for r in results]
    fig = Figure(figsize=(11, 4.4))
    panels = (("ttft_p50_s", "time to first token, p50 (s)", "#4C72B0"),
              ("tpot_p50_ms", "time per output token, p50 (ms)", "#DD8452"),
              ("output_tokens_per_s", "output tokens/s", "#55A868"))
    for i, (key, label, color) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        med = [r[key]["median"] for r in results]
        err = [[m - r[key]["min"] for m, r in zip(med, results)], [r[key]["max"] - m for m, r in zip(med, results)]]
        ax.errorbar(budgets, med, yerr=err, fmt="o-", color=color, capsize=4, lw=1.5)
        for b, m in zip(budgets, med):
            ax.annotate(f"{m:.3g}", (b, m), textcoords="offset points", xytext=(6, 6), fontsize=8.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("token budget (tokens per step)")
        ax.set_xlim(min(budgets) / 1.6, max(budgets) * 1.6)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, max(r[key]["max"] for r in results) * 1.25 or 1)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if results:
        r = results[0]
        fig.suptitle(f"Chunked prefill: latency and throughput against the step's token budget\n"
                     f"{_workload(r)}", fontsize=9.5)
    fig.subplots_adjust(wspace=0.3, top=0.76, bottom=0.13, left=0.06, right=0.98)
    return fig


def progression_chart(result: dict) -> Figure:
    """Lesson 15: one workload through every engine of the course (``bench progression``).
    Total tokens/s per stage on a log scale (median, min–max whiskers), each bar labelled
    with its speed-up over lesson 01's loop."""
    stages = result["stages"]
    names = [s["label"] for s in stages]
    stats = [s["total_tokens_per_s"] for s in stages]
    med = [s["median"] for s in stats]
    fig = Figure(figsize=(10, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    rows = list(range(len(stages)))[::-1]  # first stage on top
    err = [[m - s["min"] for m, s in zip(med, stats)], [s["max"] - m for m, s in zip(med, stats)]]
    ax.barh(rows, med, xerr=err, capsize=4, color=["#999999"] * 3 + ["#4C72B0"] * (len(stages) - 3), height=0.6)
    for row, m, s in zip(rows, med, stats):
        ax.annotate(f"{m:,.0f} tokens/s  ({m / med[0]:.0f}×)", (s["max"], row), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=9.5)
    ax.set_yticks(rows, names)
    ax.set_xscale("log")
    ax.set_xlim(min(s["min"] for s in stats) * 0.5, max(s["max"] for s in stats) * 8)
    ax.set_xlabel("total tokens/s (prompt + output), log scale; median of runs")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle(
        f"{result['num_prompts']} requests sharing a {result['prefix_len']}-token system prompt, "
        f"{result['input_len']} tokens each of their own, {result['output_len']} generated; "
        f"{result['model']}, {result['dtype']}\nmeasured {result['date']} on {result['machine']}", fontsize=9)
    fig.subplots_adjust(left=0.27, right=0.97, top=0.85, bottom=0.14)
    return fig
