"""Lesson 16's picture: the blocks one request holds as it grows, with and without a sliding window.

When every layer of a model attends through a window of ``W`` tokens, the KV cache manager
gives back each block that falls wholly before the window of the request's next token
(``slide_window``), so the request holds about ``W / block_size + 1`` blocks however long it
grows. With full attention (or a single global layer among local ones) it holds
``ceil(tokens / block_size)``. :func:`blocks_held` and :func:`last_table` read a trace into
plain numbers (the testable part); :func:`sliding_window_blocks` only draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from nanoengine.trace import Trace, replay
from nanoengine.viz.style import REQUEST_PALETTE, pale

HELD, GIVEN_BACK = "held", "given back"
_GIVEN_BACK_COLOR = "#F2F2F2"
_ROW_PITCH = 1.5  # rows of the bottom panel: cells 0.8 high, then the window's bracket


def blocks_held(trace: Trace, request_id: str) -> list[int]:
    """How many blocks ``request_id`` holds at the end of each step of ``trace`` (one count per
    :func:`~nanoengine.trace.replay` snapshot; 0 before it arrives and once it is freed).
    Entries given back out of the window hold nothing."""
    return [sum(block is not None for block in snapshot.tables.get(request_id, ())) for snapshot in replay(trace)]


def last_table(trace: Trace, request_id: str) -> tuple[list[int | None], int]:
    """``request_id``'s block table at the last step it held one (None: an entry given back out
    of the window) and how many tokens it then held. ``([], 0)`` if it never held a block."""
    for snapshot in reversed(replay(trace)):
        table = snapshot.tables.get(request_id)
        if table:
            return table, (len(table) - 1) * trace.block_size + len(snapshot.tokens[table[-1]])
    return [], 0


def sliding_window_bound(window: int, block_size: int) -> int:
    """The most blocks a decoding request of an all-sliding model holds: its window's keys
    span at most ``ceil(window / block_size) + 1`` blocks (they need not start on a boundary)."""
    return math.ceil(window / block_size) + 1


def sliding_window_blocks(runs: Mapping[str, tuple[Trace, int | None]], request_id: str, title: str = "") -> Figure:
    """Top: the blocks ``request_id`` holds after each engine step, one line per run, with the
    bound ``ceil(window / block_size) + 1`` of each windowed run dashed. Bottom: each run's
    block table at the request's last step, one cell per entry (logical block), coloured where
    it holds a block and pale where the block was given back, the window's span bracketed.

    ``runs[label]``: the trace of one run of the same request and its sliding window (None:
    full attention). Artists carry gids for tests: the lines ``label``, the cells
    ``"{label}:held"`` and ``"{label}:given back"``, the bounds ``"{label}:bound"``.
    """
    fig = Figure(figsize=(10, 6))
    top, bottom = fig.subplots(2, 1, height_ratios=(2, 1))
    longest = 1
    colors = (REQUEST_PALETTE[1], REQUEST_PALETTE[0], *REQUEST_PALETTE[2:]) * (1 + len(runs) // len(REQUEST_PALETTE))
    for row, (color, (label, (trace, window))) in enumerate(zip(colors, runs.items())):
        held = blocks_held(trace, request_id)
        top.plot(range(len(held)), held, drawstyle="steps-mid", color=color, lw=2, label=label, gid=label)
        live = [step for step, count in enumerate(held) if count]
        if live:
            top.annotate(f"{held[live[-1]]} at its last step", (live[-1], held[live[-1]]), xytext=(-4, 5),
                         textcoords="offset points", ha="right", fontsize=8, color=color)
        if window is not None:
            bound = sliding_window_bound(window, trace.block_size)
            top.axhline(bound, color=color, lw=1, ls="--", gid=f"{label}:bound",
                        label=f"its bound once decoding: ceil({window} / {trace.block_size}) + 1 = {bound}")
        table, num_tokens = last_table(trace, request_id)
        longest = max(longest, len(table))
        y = _ROW_PITCH * (len(runs) - 1 - row)
        cells: dict[str, list[Rectangle]] = {HELD: [], GIVEN_BACK: []}
        for index, block in enumerate(table):
            cells[GIVEN_BACK if block is None else HELD].append(Rectangle((index, y), 0.92, 0.8))
            if block is not None:
                bottom.text(index + 0.46, y + 0.4, str(block), ha="center", va="center", fontsize=7, color="white")
        bottom.add_collection(PatchCollection(cells[HELD], facecolor=color, edgecolor="white", gid=f"{label}:held"))
        bottom.add_collection(PatchCollection(cells[GIVEN_BACK], facecolor=_GIVEN_BACK_COLOR,
                                              edgecolor=pale(color, 0.6), hatch="////", lw=0.6,
                                              gid=f"{label}:given back"))
        if window is not None and num_tokens:
            # the last token computed (position num_tokens - 1) saw keys num_tokens - window .. num_tokens - 1
            start = max(0, num_tokens - window) / trace.block_size
            end = num_tokens / trace.block_size
            bottom.annotate("", (start, y + 0.9), (end, y + 0.9), annotation_clip=False,
                            arrowprops=dict(arrowstyle="|-|", color="black", lw=1, shrinkA=0, shrinkB=0,
                                            mutation_scale=3))
            bottom.text(end, y + 0.95, f"the last token's window: {window} tokens", ha="right", va="bottom",
                        fontsize=7)
        bottom.text(-0.4, y + 0.4, f"{label}\n{num_tokens} tokens", ha="right", va="center", fontsize=8)
    top.set_xlabel("engine step")
    top.set_ylabel(f"blocks held by request {request_id}")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylim(bottom=0)
    top.legend(fontsize=8, loc="upper left", frameon=False)
    top.spines[["top", "right"]].set_visible(False)
    bottom.set_xlim(-0.1, longest + 0.1)
    every = max(1, math.ceil(longest / 25))
    bottom.set_xticks([i + 0.46 for i in range(0, longest, every)], [str(i) for i in range(0, longest, every)])
    bottom.set_ylim(-0.1, _ROW_PITCH * (len(runs) - 1) + 1.3)
    bottom.set_xlabel("entries of the block table at the request's last step (the number: the physical block held)")
    bottom.set_yticks([])
    bottom.spines[["top", "right", "left"]].set_visible(False)
    bottom.legend(handles=[Patch(facecolor="#8C8C8C", label="holds a block"),
                           Patch(facecolor=_GIVEN_BACK_COLOR, edgecolor="#999999", hatch="////",
                                 label="given back: OUT_OF_WINDOW")],
                  fontsize=8, loc="lower right", bbox_to_anchor=(1, 1.02), ncols=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.2, right=0.97, top=0.92 if title else 0.96, bottom=0.08, hspace=0.4)
    return fig
