"""Lesson 03's pictures of paging: the block pool as a grid, and block tables pointing into it.

A block is drawn as ``block_size`` slots side by side, so a request's partly filled last
block (the only memory paging wastes) shows as coloured slots followed by pale hatched
ones. Slots are drawn as one collection per kind (gid ``"filled"``, ``"reserved"``,
``"free"``) so that a pool of thousands of blocks still draws quickly. Both panels of
:func:`block_tables` share one scale (data units per inch), so a block looks the same on
either side of the arrows.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Patch, Rectangle

from nanoengine.trace import PoolSnapshot, Trace
from nanoengine.viz.style import pale, request_colors

FREE, FILLED, RESERVED = "free", "filled", "reserved"
_GAP = 0.6  # between blocks in a row, in slot widths (a slot is 1 x 1)
_PITCH = 1.9  # pool row to row; the space under a block holds its id
_TABLE_PITCH = 2.2  # block-table row to row; the space above a block holds its label
_ARROWS = 5.0  # height of the space the arrows cross between the two panels, in slot units
_HATCH = "////"
_FREE_EDGE = "#BBBBBB"


def trace_colors(trace: Trace) -> dict[str, str]:
    """A colour for every request that appears anywhere in ``trace``: pass it to each
    snapshot's picture so a request keeps its colour from admission to free."""
    return request_colors(e.request_id for e in trace.events)


def slot_states(snapshot: PoolSnapshot, block_size: int) -> list[list[str]]:
    """Per block, per slot: ``FILLED`` (a token is written), ``RESERVED`` (the block is owned
    but the slot is still empty) or ``FREE`` (the block is in the free queue).

    Tokens fill a block from offset 0, so an owned block's first ``len(tokens[b])`` slots are
    filled. :func:`block_pool_grid` draws exactly these states.
    """
    return [[FREE] * block_size if owner is None
            else [FILLED if s < len(tokens) else RESERVED for s in range(block_size)]
            for owner, tokens in zip(snapshot.owner, snapshot.tokens)]


def block_pool_grid(snapshot: PoolSnapshot, block_size: int, ax: Axes | None = None, title: str | None = None,
                    colors: dict[str, str] | None = None) -> Figure:
    """The pool as rows of blocks, coloured by owning request; free blocks white, block ids beneath.

    ``colors`` maps request ids to colours (default: :func:`request_colors` of the live
    requests); pass :func:`trace_colors` to keep colours stable across snapshots.
    Draws into ``ax`` when given (and returns its figure), so animations can redraw a frame.
    """
    if ax is None:
        width, height = _pool_size(len(snapshot.owner), block_size)
        scale = 8.4 / width  # inches per slot
        fig = Figure(figsize=(11, height * scale + 0.55))
        ax = fig.add_axes((0.1 / 11, 0.1 / fig.get_figheight(), 8.4 / 11, height * scale / fig.get_figheight()))
    colors = colors if colors is not None else request_colors(snapshot.tables)
    _draw_pool(ax, snapshot, block_size, colors)
    used = sum(owner is not None for owner in snapshot.owner)
    tokens = sum(len(t) for t in snapshot.tokens)
    ax.set_title(title if title is not None else
                 f"block pool after step {snapshot.step}: {used} of {len(snapshot.owner)} blocks used, "
                 f"{tokens} tokens in {used * block_size} reserved slots", fontsize=10)
    ax.legend(handles=_legend_handles(snapshot, colors), loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=8, frameon=False)
    return ax.figure


def block_tables(snapshot: PoolSnapshot, block_size: int, colors: dict[str, str] | None = None) -> Figure:
    """Each live request's block table as a row of logical blocks (top), with an arrow from
    each logical block down to the physical block that holds it in the pool (bottom).

    Consecutive logical blocks land on scattered physical blocks: the point of paging. Each
    logical block is labelled ``i → b`` (logical index, physical block), so the table reads
    even where arrows cross; arrows pass behind blocks so they never hide a token.
    """
    colors = colors if colors is not None else request_colors(snapshot.tables)
    requests = sorted(snapshot.tables)
    longest = max((len(t) for t in snapshot.tables.values()), default=1)
    table_width, table_height = 2.0 + longest * (block_size + _GAP), len(requests) * _TABLE_PITCH + 0.3
    pool_width, pool_height = _pool_size(len(snapshot.owner), block_size)
    scale = 8.4 / max(table_width, pool_width)  # inches per slot, the same in both panels
    fig = Figure(figsize=(11, (table_height + _ARROWS + pool_height) * scale + 0.5))
    w, h = fig.get_figwidth(), fig.get_figheight()
    middle = 0.1 + max(table_width, pool_width) * scale / 2
    pool = fig.add_axes(((middle - pool_width * scale / 2) / w, 0.1 / h,
                         pool_width * scale / w, pool_height * scale / h))
    logical = fig.add_axes(((middle - table_width * scale / 2) / w, 1 - (table_height * scale + 0.4) / h,
                            table_width * scale / w, table_height * scale / h))
    block_pool_grid(snapshot, block_size, ax=pool, title="physical blocks: the pool", colors=colors)
    logical.set_xlim(-2.0, table_width - 2.0)
    logical.set_ylim(table_height - 0.9, -0.9)
    logical.set_aspect("equal")
    logical.axis("off")
    logical.set_title("logical blocks: each request's block table", fontsize=10)
    filled, reserved, outlines, placed = [], [], [], []
    per_row, states = _blocks_per_row(len(snapshot.owner)), slot_states(snapshot, block_size)
    for row, request_id in enumerate(requests):
        y, color = row * _TABLE_PITCH, colors[request_id]
        logical.text(-0.5, y + 0.5, request_id, ha="right", va="center", fontsize=11, weight="bold", color=color)
        for i, block_id in enumerate(snapshot.tables[request_id]):
            x = i * (block_size + _GAP)
            _block_slots(x, y, states[block_id], color, filled, reserved)
            outlines.append(Rectangle((x, y), block_size, 1))
            placed.append((x, y, snapshot.tokens[block_id]))
            logical.text(x + block_size / 2, y - 0.1, f"{i} → {block_id}", ha="center", va="bottom", fontsize=7,
                         color=color)
            px, py = _block_origin(block_id, block_size, per_row)
            # Neither panel draws a background, so at zorder -1 an arrow passes behind the blocks it crosses.
            fig.add_artist(ConnectionPatch((x + block_size / 2, y + 1), (px + block_size / 2, py), "data", "data",
                                           axesA=logical, axesB=pool, arrowstyle="-|>", mutation_scale=8,
                                           color=color, lw=0.9, alpha=0.8, zorder=-1))
    _add_slots(logical, filled, reserved, outlines)
    _token_text(logical, snapshot, block_size, placed)
    return fig


def _blocks_per_row(num_blocks: int) -> int:
    return 8 if num_blocks <= 64 else 16


def _pool_size(num_blocks: int, block_size: int) -> tuple[float, float]:
    """Width and height of the pool grid in slot units."""
    rows = -(-num_blocks // _blocks_per_row(num_blocks))
    return _blocks_per_row(num_blocks) * (block_size + _GAP) + 0.3, rows * _PITCH + 0.3


def _block_origin(block_id: int, block_size: int, per_row: int) -> tuple[float, float]:
    """Top-left corner of a block in the pool's data coordinates (the y axis points down)."""
    return (block_id % per_row) * (block_size + _GAP), (block_id // per_row) * _PITCH


def _draw_pool(ax: Axes, snapshot: PoolSnapshot, block_size: int, colors: dict[str, str]) -> None:
    per_row = _blocks_per_row(len(snapshot.owner))
    width, height = _pool_size(len(snapshot.owner), block_size)
    ax.set_xlim(-0.3, width - 0.3)
    ax.set_ylim(height - 0.3, -0.3)
    ax.set_aspect("equal")
    ax.set_anchor("NW")
    ax.axis("off")
    filled, reserved, free, outlines = [], [], [], []
    for block_id, states in enumerate(slot_states(snapshot, block_size)):
        x, y = _block_origin(block_id, block_size, per_row)
        owner = snapshot.owner[block_id]
        if owner is None:
            free.append(Rectangle((x, y), block_size, 1))
        else:
            outlines.append(Rectangle((x, y), block_size, 1))
            _block_slots(x, y, states, colors[owner], filled, reserved)
        ax.text(x + block_size / 2, y + 1.08, str(block_id), ha="center", va="top", fontsize=6, color="dimgray")
    ax.add_collection(PatchCollection(free, fc="white", ec=_FREE_EDGE, lw=0.8, gid=FREE))
    _add_slots(ax, filled, reserved, outlines)
    _token_text(ax, snapshot, block_size,
                [(*_block_origin(b, block_size, per_row), tokens) for b, tokens in enumerate(snapshot.tokens)])


def _block_slots(x: float, y: float, states: list[str], color: str,
                 filled: list[tuple[Rectangle, str]], reserved: list[tuple[Rectangle, str]]) -> None:
    """Append the slots of one owned block drawn at ``(x, y)`` to ``filled`` or ``reserved`` by state."""
    for s, state in enumerate(states):
        (filled if state == FILLED else reserved).append((Rectangle((x + s, y), 1, 1), color))


def _add_slots(ax: Axes, filled: list[tuple[Rectangle, str]], reserved: list[tuple[Rectangle, str]],
               outlines: list[Rectangle]) -> None:
    """Filled slots in the owner's colour, reserved-but-empty ones pale and hatched, owned blocks outlined."""
    ax.add_collection(PatchCollection([r for r, _ in filled], fc=[c for _, c in filled], ec="white", lw=0.6,
                                      gid=FILLED))
    ax.add_collection(PatchCollection([r for r, _ in reserved], fc=[_pale(c) for _, c in reserved], ec="white",
                                      lw=0.6, hatch=_HATCH, gid=RESERVED))
    ax.add_collection(PatchCollection(outlines, fc="none", ec="black", lw=0.8))


def _token_text(ax: Axes, snapshot: PoolSnapshot, block_size: int,
                placed: list[tuple[float, float, list[int]]]) -> None:
    """Write each ``(x, y, tokens)`` block's token ids into its slots, in a font that fits one
    slot of ``ax``; only for small pools, where the numbers stay readable."""
    if block_size > 16 or len(snapshot.owner) > 64:
        return
    left, right = ax.get_xlim()
    slot_points = ax.get_position().width * ax.figure.get_figwidth() * 72 / (right - left)
    digits = max((len(str(t)) for tokens in snapshot.tokens for t in tokens), default=1)
    size = max(3.0, min(7.0, slot_points / (0.75 * digits)))
    for x, y, tokens in placed:
        for s, token in enumerate(tokens):
            ax.text(x + s + 0.5, y + 0.5, str(token), ha="center", va="center", fontsize=size, color="white")


def _pale(color: str) -> tuple[float, float, float]:
    return pale(color, 0.3)


def _legend_handles(snapshot: PoolSnapshot, colors: dict[str, str]) -> list[Patch]:
    handles = [Patch(fc=colors[r], label=f"{r}: {sum(len(snapshot.tokens[b]) for b in t)} tokens in {len(t)} blocks")
               for r, t in sorted(snapshot.tables.items())]
    return handles + [Patch(fc=_pale("#8C8C8C"), ec="white", hatch=_HATCH, label="reserved slot, not yet written"),
                      Patch(fc="white", ec=_FREE_EDGE, label="free block")]
