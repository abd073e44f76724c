"""Lesson 10's pictures: what each verification accepted, and where speculation pays."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from nanoengine.viz.style import REQUEST_PALETTE


def accepted_per_step(history: Sequence[Sequence[int]], title: str = "", last: int = 80) -> Figure:
    """Left: the ``last`` verifications in order, each one's guesses (outline), the accepted ones
    (filled) and the token the target adds; right: how many tokens each verification of the
    whole history emitted.

    ``history``: ``(step, guesses, accepted)`` per verification, as ``SpecDecodeStats.history``
    and ``nanoengine bench latency``'s ``speculation.history`` hold them.
    """
    fig = Figure(figsize=(11, 3.8))
    timeline, counts = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    shown = history[-last:]
    index = list(range(len(history) - len(shown), len(history)))
    accepted = [a for _, _, a in shown]
    timeline.bar(index, accepted, width=0.8, color=REQUEST_PALETTE[0], label="accepted guesses")
    timeline.bar(index, [1] * len(index), bottom=accepted, width=0.8, color=REQUEST_PALETTE[1],
                 label="the target's own token")
    timeline.bar(index, [g for _, g, _ in shown], width=0.8, color="none", edgecolor="#555555", lw=0.6,
                 label="guesses", zorder=3)
    timeline.set_xlabel("verification (one engine step of one request)")
    timeline.set_ylabel("tokens")
    timeline.legend(fontsize=8, loc="upper left", ncols=3, frameon=False)
    most = max((g for _, g, _ in history), default=0) + 1
    emitted = [a + 1 for _, _, a in history]
    timeline.set_ylim(0, most + 1.5)
    counts.bar(range(1, most + 1), [emitted.count(n) for n in range(1, most + 1)], color=REQUEST_PALETTE[0])
    mean = sum(emitted) / len(emitted) if emitted else 1.0
    counts.axvline(mean, color="black", lw=1, ls="--")
    counts.annotate(f"mean {mean:.2f} tokens per verification", (mean, 1), xycoords=("data", "axes fraction"),
                    xytext=(6, -14), textcoords="offset points", fontsize=9)
    counts.set_xlabel("tokens emitted (accepted guesses + 1)")
    counts.set_ylabel(f"verifications (all {len(history)})")
    for ax in (timeline, counts):
        ax.spines[["top", "right"]].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.25, top=0.86 if title else 0.95, bottom=0.14)
    return fig


def speculation_speedup(baseline: Sequence[dict], speculative: dict[str, Sequence[dict]]) -> Figure:
    """Decode tokens/s with speculation over without, against the batch size: where it stops
    paying. ``baseline`` and each ``speculative[label]``: ``nanoengine bench latency`` results
    of the same workload, one per batch size."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    base = {r["batch_size"]: r["decode_tokens_per_s"]["median"] for r in baseline}
    for color, (label, results) in zip(REQUEST_PALETTE, speculative.items()):
        points = sorted((r["batch_size"], r["decode_tokens_per_s"]["median"] / base[r["batch_size"]])
                        for r in results if r["batch_size"] in base)
        ax.plot([b for b, _ in points], [s for _, s in points], marker="o", color=color, label=label)
        for b, s in points:
            ax.annotate(f"{s:.2f}×", (b, s), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(base), [str(b) for b in sorted(base)])
    ax.set_xlabel("batch size (requests decoding together)")
    ax.set_ylabel("decode tokens/s, speculative / plain")
    ax.legend(fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    if baseline:
        r = baseline[0]
        ax.set_title(f"{r['model']}, {r['dtype']}, {r['output_len']} tokens per request\n"
                     f"measured {r['date']} on {r['machine']}", fontsize=8)
    fig.tight_layout()
    return fig
