"""One request's token timeline: which positions each step computes, with and without a KV cache."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from nanoengine.viz.style import COLORS

_EMPTY, _CACHED, _PROMPT, _NEW = 0, 1, 2, 3


def _grid(prompt_len: int, num_output: int, cached: bool) -> np.ndarray:
    """Rows are decode steps, columns positions; a cell says what the step did with that position."""
    length = prompt_len + num_output
    grid = np.full((num_output, length), _EMPTY)
    for step in range(num_output):
        visible = prompt_len + step  # positions the model sees at this step
        for pos in range(visible):
            computed = not cached or step == 0 or pos == visible - 1
            grid[step, pos] = (_PROMPT if pos < prompt_len else _NEW) if computed else _CACHED
    return grid


def token_timeline(prompt_len: int = 6, num_output: int = 10) -> Figure:
    """Side by side: lesson 01 recomputes every position at every step; lesson 02 computes one."""
    fig = Figure(figsize=(11, 4.6))
    cmap = ListedColormap(["white", COLORS["cached"], COLORS["prompt"], COLORS["new"]])
    for i, cached in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        grid = _grid(prompt_len, num_output, cached)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=3, aspect="auto")
        ax.set_xticks(np.arange(-0.5, grid.shape[1]), minor=True)
        ax.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="minor", length=0)
        computed = int(((grid == _PROMPT) | (grid == _NEW)).sum())
        title = "with a KV cache (lesson 02)" if cached else "recompute everything (lesson 01)"
        ax.set_title(f"{title}\n{computed} token-forwards for {num_output} tokens", fontsize=10)
        ax.set_xlabel("position in the sequence")
        ax.set_ylabel("decode step" if i == 0 else "")
        ax.set_yticks(range(num_output))
        ax.set_xticks(range(0, grid.shape[1], 2))
    fig.legend(
        handles=[
            _patch(COLORS["prompt"], "prompt token computed"),
            _patch(COLORS["new"], "generated token computed"),
            _patch(COLORS["cached"], "K/V read from the cache"),
        ],
        loc="lower center", ncol=3, frameon=False, fontsize=9,
    )
    fig.subplots_adjust(bottom=0.2, top=0.86, wspace=0.15)
    return fig


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)
