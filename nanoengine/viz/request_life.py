"""Lesson 13: requests' lives as a client sees them, from sending to the last streamed token.

Each request is a row: a thin bar while it waits for its first token (queueing and prefill:
the time to first token), then a tick for every streamed chunk and a thicker bar through
decoding to the last one. Concurrent requests stacked this way show what a server's
scheduler does to each user: who waited, whose stream paused while others' prompts ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from matplotlib.figure import Figure

from nanoengine.viz.style import REQUEST_PALETTE


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLife:
    """One request: when it was sent and when each streamed chunk arrived (same clock, seconds)."""

    label: str
    sent: float
    chunks: tuple[float, ...]

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def longest_gap(self) -> float:
        """The longest wait between two consecutive chunks (0 with fewer than two)."""
        return max((b - a for a, b in zip(self.chunks, self.chunks[1:])), default=0.0)


def request_lives(lives: Sequence[RequestLife], title: str = "Requests as the client saw them") -> Figure:
    """Rows of requests on one time axis, starting at the earliest ``sent``."""
    if not lives or any(not life.chunks for life in lives):
        raise ValueError("every request needs at least one streamed chunk")
    origin = min(life.sent for life in lives)
    fig = Figure(figsize=(10, 0.45 * len(lives) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    for row, life in enumerate(lives):
        color = REQUEST_PALETTE[row % len(REQUEST_PALETTE)]
        first, last = life.chunks[0] - origin, life.chunks[-1] - origin
        ax.plot([life.sent - origin, first], [row, row], color=color, lw=1.5, alpha=0.5)
        ax.plot([first, last], [row, row], color=color, lw=6, alpha=0.35, solid_capstyle="butt")
        ax.vlines([c - origin for c in life.chunks], row - 0.3, row + 0.3, color=color, lw=0.8)
        ax.text(last, row, f"  TTFT {life.ttft:.2f} s, {len(life.chunks)} chunks, longest gap {life.longest_gap:.2f} s",
                va="center", fontsize=8)
    ax.set_yticks(range(len(lives)), [life.label for life in lives])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first request was sent")
    ax.set_title(f"{title}\nthin line: waiting for the first token (queue + prefill); ticks: streamed chunks",
                 fontsize=10)
    end = max(life.chunks[-1] for life in lives) - origin
    ax.set_xlim(0, end * 1.45 if end > 0 else 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig
