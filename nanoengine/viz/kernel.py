"""Lesson 05's picture of the decode kernel: who computes what, from the grid down to one thread.

Three panels, top to bottom, in the order the kernel runs: (1) the launch grid, one thread
block per (sequence, query head); (2) inside one block, the token positions each thread
reads (thread ``t`` takes ``t, t + threads, ...``) and the physical block each logical block
is found in through the block table; (3) after the barrier, the merge of the threads'
partial softmaxes in shared memory. The block table is a fixed shuffle, so the picture is
the same every time.
"""

from __future__ import annotations

import math
import random

from matplotlib.axes import Axes
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from nanoengine.attention.numba_cuda import THREADS_PER_BLOCK

_ACCENT = "#4C72B0"
_IDLE = "#E8E8E8"
_INK = "#222222"


def thread_color(tid: int, threads: int) -> tuple[float, float, float]:
    """A pale hue per thread, going once round the colour wheel over a block's threads, so a
    stride of ``threads`` positions shows as the same rainbow repeating."""
    return tuple(hsv_to_rgb((0.9 * tid / max(1, threads), 0.45, 0.97)))


def example_block_table(num_logical_blocks: int, seed: int = 5) -> list[int]:
    """Scattered physical block ids for the pictured sequence (a fixed shuffle of a pool
    three times its size), as a real pool would hand them out after some churn."""
    return random.Random(seed).sample(range(1, 3 * num_logical_blocks + 5), num_logical_blocks)


def kernel_thread_mapping(
    num_seqs: int = 2,
    num_heads: int = 3,
    threads: int = THREADS_PER_BLOCK,
    seq_len: int = 72,
    block_size: int = 16,
    head_dim: int = 64,
    focus_thread: int = 5,
) -> Figure:
    """The numba.cuda decode kernel's work split, for a block of ``threads`` threads over a
    sequence of ``seq_len`` tokens in ``block_size``-token blocks (``head_dim`` only sizes the
    shared accumulator). ``focus_thread`` is outlined and its reads spelled out."""
    if min(num_seqs, num_heads, threads, seq_len, block_size, head_dim) < 1:
        raise ValueError("every size must be at least 1")
    focus_thread = focus_thread % threads
    num_logical = math.ceil(seq_len / block_size)
    table = example_block_table(num_logical)

    cell = min(1.0, 17.0 / block_size)  # a token slot in panel 2, in figure units
    row_pitch = 1.55
    top2 = 3.0  # first logical block's row
    bottom2 = max(top2 + num_logical * row_pitch, 10.6)
    barrier = bottom2 + 3.9
    top3 = barrier + 1.3
    acc_rows = min(6, head_dim)
    bottom3 = top3 + 4.5 + acc_rows * 0.75 + 3.0
    width = 48.0
    fig = Figure(figsize=(11, 11 * bottom3 / width))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(bottom3, 0)
    ax.set_aspect("equal")
    ax.axis("off")

    focus_box = _draw_grid(ax, num_seqs, num_heads, threads)
    left2 = _draw_positions(ax, threads, seq_len, block_size, table, cell, top2, row_pitch, focus_thread)
    # Over the grid, not across it: from the top of the highlighted block to panel 2's header.
    ax.add_patch(FancyArrowPatch(focus_box, (15.0, top2 - 0.45), arrowstyle="-|>", mutation_scale=12,
                                 color=_ACCENT, lw=1.4, connectionstyle="arc3,rad=-0.06"))
    _draw_thread_loop(ax, threads, seq_len, block_size, table, focus_thread, bottom2 + 0.4)

    ax.plot([0.3, width - 0.3], [barrier, barrier], color=_INK, ls=(0, (6, 4)), lw=1.2)
    ax.text(width / 2, barrier, "cuda.syncthreads():  wait until every thread has published its m, l and acc",
            ha="center", va="center", fontsize=9, weight="bold", color=_INK, bbox=dict(fc="white", ec="none", pad=2))

    _draw_reduction(ax, threads, head_dim, acc_rows, top3, focus_thread)
    return fig


def _draw_grid(ax: Axes, num_seqs: int, num_heads: int, threads: int) -> tuple[float, float]:
    """Panel 1; returns the top centre of the highlighted block, where the zoom arrow starts."""
    ax.text(0.3, 0.5, "① the launch grid", fontsize=10, weight="bold", va="center")
    ax.text(0.3, 1.35, "one thread block per (sequence, query head)", fontsize=7.5, va="center", color="dimgray")
    box_w, box_h, gap = min(3.4, 10.5 / num_heads - 0.35), min(1.5, 5.6 / num_seqs - 0.35), 0.35
    x0, y0 = 2.0, 3.0
    grid_bottom = y0 + num_seqs * (box_h + gap) - gap
    ax.text(x0 + num_heads * (box_w + gap) / 2, grid_bottom + 0.45, "blockIdx.y = query head  →", ha="center",
            fontsize=7, color="dimgray")
    ax.text(x0 - 0.9, y0 + num_seqs * (box_h + gap) / 2, "blockIdx.x = seq  →", rotation=-90,
            ha="center", va="center", fontsize=7, color="dimgray")
    for s in range(num_seqs):
        for h in range(num_heads):
            x, y = x0 + h * (box_w + gap), y0 + s * (box_h + gap)
            focus = (s, h) == (0, 0)
            ax.add_patch(Rectangle((x, y), box_w, box_h, fc=_ACCENT if focus else _IDLE, ec=_INK, lw=0.8))
            ax.text(x + box_w / 2, y + box_h / 2, f"seq {s}\nhead {h}", ha="center", va="center", fontsize=7.5,
                    color="white" if focus else _INK, linespacing=1.1)
    ax.text(0.3, max(7.6, grid_bottom + 1.2), f"{num_seqs * num_heads} blocks × {threads} threads.\n"
            "Each block has its own shared memory\nand never waits for another.\n"
            "GQA: query head h reads KV head\nh // (query heads per KV head).", fontsize=7.5, va="top",
            color=_INK, linespacing=1.35)
    return x0 + box_w / 2, y0


def _draw_positions(ax: Axes, threads: int, seq_len: int, block_size: int, table: list[int], cell: float,
                    top: float, pitch: float, focus_thread: int) -> float:
    """Panel 2: the sequence's logical blocks as rows of slots, each slot labelled with the
    thread that reads it; returns the panel's left edge."""
    left = 19.5
    right = left + block_size * cell
    ax.text(15.2, 0.5, f"② inside block (seq 0, head 0): thread t reads positions t, t+{threads}, "
            f"t+{2 * threads}, …", fontsize=10, weight="bold", va="center")
    ax.text(15.2, 1.35, f"seq_len {seq_len}, blocks of {block_size} tokens; the number in a slot is the thread "
            "that reads that token's K and V", fontsize=7.5, va="center", color="dimgray")
    ax.text(left - 0.3, top - 0.45, "logical block", ha="right", va="center", fontsize=7, color="dimgray")
    ax.text(right + 1.8, top - 0.45, "where it is (the block table)", va="center", fontsize=7, color="dimgray")
    label_size = min(7.0, 16 * cell)
    for i in range(math.ceil(seq_len / block_size)):
        y = top + i * pitch
        first, last = i * block_size, min(seq_len, (i + 1) * block_size) - 1
        ax.text(left - 0.3, y + 0.5, f"{i}: pos {first}–{last}", ha="right", va="center", fontsize=7.5, color=_INK)
        for s in range(block_size):
            pos, x = i * block_size + s, left + s * cell
            if pos >= seq_len:
                ax.add_patch(Rectangle((x, y), cell, 1, fc="white", ec="#BBBBBB", lw=0.6, hatch="////"))
                continue
            tid = pos % threads
            ax.add_patch(Rectangle((x, y), cell, 1, fc=thread_color(tid, threads), ec="white", lw=0.6))
            if cell >= 0.55:
                ax.text(x + cell / 2, y + 0.5, str(tid), ha="center", va="center", fontsize=label_size, color=_INK)
        for s in range(block_size):  # outlines on top, so neighbours' white edges do not cover them
            pos = i * block_size + s
            if pos < seq_len and pos % threads == focus_thread:
                ax.add_patch(Rectangle((left + s * cell, y), cell, 1, fc="none", ec=_INK, lw=1.8))
        ax.add_patch(Rectangle((left, y), block_size * cell, 1, fc="none", ec=_INK, lw=0.8))
        ax.annotate("", xy=(right + 1.6, y + 0.5), xytext=(right + 0.2, y + 0.5),
                    arrowprops=dict(arrowstyle="-|>", color="dimgray", lw=0.9))
        ax.text(right + 1.8, y + 0.5, f"block_tables[0, {i}] = {table[i]}", va="center", fontsize=7.5,
                family="monospace", color=_INK)
    if seq_len % block_size:
        last_row = top + (math.ceil(seq_len / block_size) - 1) * pitch
        ax.text(right + 13.0, last_row + 0.5, "hatched: past seq_len,\nnever read", va="center", fontsize=7,
                color="dimgray")
    return left


def _draw_thread_loop(ax: Axes, threads: int, seq_len: int, block_size: int, table: list[int], tid: int,
                      y: float) -> None:
    """Panel 2's worked example: one thread's loop, its block-table lookups and its online softmax."""
    reads = [f"pos {p} → k_cache[{table[p // block_size]}, {p % block_size}]" for p in range(tid, seq_len, threads)]
    shown = "   ·   ".join(reads[:4]) + ("   ·   …" if len(reads) > 4 else "")
    ax.text(15.2, y + 0.4, f"thread {tid} (outlined):", fontsize=8, weight="bold", va="center", color=_INK)
    ax.text(21.3, y + 0.4, shown if reads else "no position: it publishes m = −inf, l = 0", fontsize=7.5,
            va="center", family="monospace", color=_INK)
    ax.text(15.2, y + 1.45, "each thread, for each of its positions, in one pass (online softmax; no score is kept):",
            fontsize=7.5, va="center", color=_INK)
    ax.text(15.2, y + 2.45, r"$s = q\cdot k \qquad m' = \max(m, s) \qquad l \leftarrow l\,e^{m-m'} + e^{s-m'}"
            r" \qquad acc \leftarrow acc\,e^{m-m'} + e^{s-m'}\,v \qquad m \leftarrow m'$",
            fontsize=9.5, va="center", color=_INK)


def _draw_reduction(ax: Axes, threads: int, head_dim: int, acc_rows: int, top: float, focus_thread: int) -> None:
    """Panel 3: the shared arrays, one column per thread, and how they merge into the output."""
    ax.text(0.3, top, "③ the reduction in shared memory: merge the threads' partial softmaxes into one",
            fontsize=10, weight="bold", va="center")
    cell = min(0.62, 20.0 / threads)
    left = 5.0
    y = top + 1.5
    if cell >= 0.45:
        for t in range(threads):
            ax.text(left + (t + 0.5) * cell, y - 0.12, str(t), ha="center", va="bottom", fontsize=5.5,
                    color="dimgray")
    ax.text(left - 0.3, y - 0.3, "thread t", ha="right", va="center", fontsize=7, color="dimgray")
    acc_top = y + 3.0
    rows = [("m_sh[t]", y, 0.75), ("l_sh[t]", y + 1.45, 0.75)]
    rows += [(f"acc_sh[t, {d}]", acc_top + d * 0.75, 0.7) for d in range(acc_rows)]
    for label, ry, h in rows:
        ax.text(left - 0.3, ry + h / 2, label, ha="right", va="center", fontsize=7.5, family="monospace",
                color=_INK)
        for t in range(threads):
            ax.add_patch(Rectangle((left + t * cell, ry), cell, h, fc=thread_color(t, threads), ec="white", lw=0.5))
        ax.add_patch(Rectangle((left, ry), threads * cell, h, fc="none", ec=_INK, lw=0.7))
    if head_dim > acc_rows:
        ax.text(left + threads * cell / 2, acc_top + acc_rows * 0.75 + 0.1, f"⋮   {head_dim} rows, one per "
                "dimension of the head", ha="center", va="top", fontsize=7, color="dimgray")
    d = focus_thread if focus_thread < acc_rows else None
    if d is not None:
        ax.add_patch(Rectangle((left, acc_top + d * 0.75), threads * cell, 0.7, fc="none", ec=_INK, lw=1.8))

    x = left + threads * cell + 0.4
    out_y = acc_top + (d if d is not None else 0) * 0.75 + 0.35
    notes = [
        (y + 0.37, r"$M = {\max}_t\; m_{sh}[t]$", "the block's maximum: every thread reads all of m_sh"),
        (y + 1.82, r"$L = {\sum}_t\; l_{sh}[t]\; e^{m_{sh}[t] - M}$",
         "the total: each thread's sum, rescaled from its own max to M"),
        (out_y, r"$out[d] = \frac{1}{L}\,{\sum}_t\; acc_{sh}[t, d]\; e^{m_{sh}[t] - M}$",
         f"thread d sums row d over all threads ({'outlined: d = ' + str(d) if d is not None else 'one row each'});\n"
         f"threads stride over head_dim: thread t does d = t, t+{threads}, …"),
    ]
    for ny, formula, text in notes:
        ax.annotate("", xy=(x + 1.5, ny), xytext=(x, ny), arrowprops=dict(arrowstyle="-|>", color="dimgray", lw=0.9))
        ax.text(x + 1.8, ny, formula, va="center", fontsize=10, color=_INK)
        ax.text(x + 1.8, ny + 0.55, text, va="top", fontsize=7, color="dimgray", linespacing=1.3)
    ax.text(0.3, acc_top + acc_rows * 0.75 + 2.1,
            f"Then one more cuda.syncthreads(), and thread t writes out[seq, head, d] for d = t, t+{threads}, … to global "
            "memory.  A thread that saw no token has m = −inf, so its weight e^(m − M) is exactly 0.",
            fontsize=7.5, va="center", color=_INK)
