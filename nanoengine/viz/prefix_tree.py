"""Lesson 08's picture of the prefix cache: the tree of cached blocks a trace registered.

A node is one *registration*: a ``cache`` event, which names a full block after the prefix
it ends. A block id is not enough to name a node, because an evicted block is handed out
again and may later cache another prefix; ``(block_id, use)`` is. A node's parent is the
node of the prefix one block shorter, so requests that share a system prompt hang off the
same branch. :func:`prefix_tree_nodes` reads the trace into node records (the testable
part); :func:`prefix_tree` only draws them, root at the left, one column per block position.

How the trace is read. Block tables are rebuilt from ``alloc``/``append``/``hit``/``fork``/
``cow``/``free`` as :func:`nanoengine.trace.replay` does, but per event rather than per step,
because a ``cache`` event's parent is decided by the table at that moment. A ``hit`` counts
for each registration it takes back; an ``evict`` (recorded when a free cached block is
handed out for new tokens, before the ``alloc``/``append`` that takes it) ends one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

from nanoengine.trace import Trace, TraceEvent
from nanoengine.viz.block_pool import trace_colors
from nanoengine.viz.style import pale

_COLUMN, _BOX_W, _BOX_H, _ROW = 2.5, 1.9, 1.0, 1.55  # layout, in data units
_SCALE = 0.75  # inches per data unit when the tree fits
_EVICTED_FACE, _EVICTED_INK, _EVICTION_INK, _INK = "#EEEEEE", "#8C8C8C", "#AA3333", "#222222"
_HATCH = "///"
_MAX_TOKENS_SHOWN = 4
_MAX_LEGEND_REQUESTS = 8


@dataclasses.dataclass(slots=True)
class PrefixNode:
    """One registration of a full block under the hash of the prefix it ends.

    ``parent`` indexes the node of the prefix one block shorter (None: the first block of a
    prompt); ``depth`` is the block's position in its table; ``use`` counts this block id's
    registrations so far (1, 2, ...); ``hits`` the ``hit`` events that took this registration
    back; ``shared`` is true once it was hit or held by two tables at once (a fork);
    ``evicted`` is the eviction's order in the trace (1 = first), None while it is cached.
    """

    block_id: int
    use: int
    tokens: tuple[int, ...]
    parent: int | None
    depth: int
    request_id: str
    step: int
    hits: int = 0
    shared: bool = False
    evicted: int | None = None


def _with_tables(trace: Trace) -> Iterator[tuple[TraceEvent, dict[str, list[int]], list[list[int]]]]:
    """Each event with the block tables and block tokens just after it (the same lists, updated in place)."""
    tables: dict[str, list[int]] = {}
    tokens: list[list[int]] = [[] for _ in range(trace.num_blocks)]
    for event in trace.events:
        kind, blocks = event.kind, event.block_ids
        if kind in ("alloc", "append"):
            table = tables.setdefault(event.request_id, [])
            table.extend(blocks)
            for b in blocks:
                tokens[b] = []
            for i, token in enumerate(event.token_ids):
                tokens[table[(event.first_position + i) // trace.block_size]].append(token)
        elif kind in ("hit", "fork"):
            tables.setdefault(event.request_id, []).extend(blocks)
        elif kind == "cow":
            shared, own = blocks
            table = tables[event.request_id]
            table[table.index(shared)] = own
            tokens[own] = list(tokens[shared])
        elif kind == "free":
            tables.pop(event.request_id, None)
        yield event, tables, tokens


def prefix_tree_nodes(trace: Trace) -> list[PrefixNode]:
    """Every registration in ``trace``, in the order they were made.

    The parent is found by the tokens of the prefix, not by the block before it in the
    table: when two requests computed the same block at once, only one copy is registered,
    and the other request's next block must still hang under it. (Blocks whose K/V differ
    by ``extra_keys`` alone, such as two LoRA adapters, are not told apart: the trace does not
    record the keys.)
    """
    nodes: list[PrefixNode] = []
    live: dict[int, int] = {}  # block id -> its node while it stays registered
    by_prefix: dict[tuple[int, ...], int] = {}  # a prefix's tokens -> its latest node
    uses: dict[int, int] = {}
    evictions = 0
    for event, tables, tokens in _with_tables(trace):
        if event.kind == "cache":
            block = event.block_ids[0]
            table = tables[event.request_id]
            depth = table.index(block)
            prefix = tuple(t for b in table[: depth + 1] for t in tokens[b])
            uses[block] = uses.get(block, 0) + 1
            parent = by_prefix.get(prefix[: -trace.block_size]) if depth else None
            live[block] = by_prefix[prefix] = len(nodes)
            nodes.append(PrefixNode(block, uses[block], tuple(tokens[block]), parent, depth, event.request_id,
                                    event.step))
        elif event.kind in ("hit", "fork"):
            for block in event.block_ids:
                if block in live:
                    node = nodes[live[block]]
                    node.hits += event.kind == "hit"
                    node.shared = True  # a fork leaves the block in two tables
        elif event.kind == "evict":
            evictions += 1
            index = live.pop(event.block_ids[0], None)  # None: registered before the trace began
            if index is not None:
                nodes[index].evicted = evictions
    return nodes


def cache_hits_per_request(trace: Trace) -> dict[str, int]:
    """Blocks each request took from the prefix cache (summed over its admissions), for every
    request that held blocks, in order of first appearance."""
    hits: dict[str, int] = {}
    for e in trace.events:
        if e.kind in ("alloc", "hit", "fork"):
            hits[e.request_id] = hits.get(e.request_id, 0) + (len(e.block_ids) if e.kind == "hit" else 0)
    return hits


def prefix_tree(trace: Trace, title: str | None = None) -> Figure:
    """The prefix cache as a tree growing to the right: a box per registration, labelled with
    its block id, first tokens and the hits it served; hatched when shared, grey with its
    eviction order when evicted; coloured by the request that computed it. Beside it, the
    blocks each request took from the cache.
    """
    nodes = prefix_tree_nodes(trace)
    hits = cache_hits_per_request(trace)
    colors = trace_colors(trace)
    ys = _rows(nodes)
    depth = max((n.depth for n in nodes), default=0) + 1
    leaves = int(max(ys, default=0)) + 1
    tree_w, tree_h = 1.3 + depth * _COLUMN, (leaves - 1) * _ROW + 1.8
    side_w = 2.6  # inches for the hits panel
    # Inches per data unit; a big tree is drawn smaller (text included) rather than overlapping.
    scale = min(_SCALE, 11.0 / tree_w, 24.0 / tree_h)
    per_request = min(0.45, 8.0 / max(len(hits), 1))  # inches per row of the hits panel
    width, height = tree_w * scale + side_w + 0.8, max(tree_h * scale, per_request * len(hits) + 1.0) + 1.95
    fig = Figure(figsize=(width, height))
    tree = fig.add_axes((0.2 / width, 1.25 / height, tree_w * scale / width, (height - 1.9) / height))
    _draw_tree(tree, nodes, ys, colors, tree_w, tree_h, scale / _SCALE)
    side_h = min(per_request * len(hits) + 0.3, height - 2.6)
    side = fig.add_axes(((width - side_w + 0.1) / width, 1 - (side_h + 1.2) / height, (side_w - 0.5) / width,
                         side_h / height))
    _draw_hits(side, hits, colors, min(9.0, 20 * per_request))
    if title is None:
        evicted = sum(n.evicted is not None for n in nodes)
        total = sum(hits.values())
        title = (f"The prefix cache: {len(nodes)} full blocks registered, "
                 f"{total} block hit{'s' if total != 1 else ''}, {evicted} evicted")
    fig.suptitle(title, fontsize=11, x=0.2 / width, ha="left", y=1 - 0.15 / height, va="top")
    computed_by = sorted({n.request_id for n in nodes})
    handles = [Patch(fc=_pale(colors[r]), ec=colors[r], label=f"computed by {r}") for r in computed_by]
    if len(handles) > _MAX_LEGEND_REQUESTS:  # the colours stay, the legend would not fit
        handles = [Patch(fc="white", ec=_EVICTED_INK, label="colour: the request that computed the block")]
    handles += [Patch(fc="white", ec=_INK, hatch=_HATCH, label="shared: taken from the cache, or held by 2+ tables"),
                Patch(fc=_EVICTED_FACE, ec=_EVICTED_INK, ls="--", lw=1.2,
                      label="evicted #k: the k-th eviction (free cached blocks go least recently used first, "
                            "a prefix's tail before its head)")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.2 / width, 0.05 / height),
               ncol=1 + len(handles) // 4, fontsize=8, frameon=False)
    fig.text(0.2 / width, 1.0 / height, "Each box: block id (and its use, if the block was evicted and reused), its "
             "tokens, and hits: how many later requests started their block table with it.",
             fontsize=8, color="#444444", va="bottom")
    return fig


def _rows(nodes: list[PrefixNode]) -> list[float]:
    """A row for each node: leaves one below the other in depth-first order (children in
    registration order), each parent level with the middle of its children."""
    children: dict[int | None, list[int]] = {}
    for i, n in enumerate(nodes):
        children.setdefault(n.parent, []).append(i)
    ys = [0.0] * len(nodes)
    next_row = 0

    def place(i: int) -> float:
        nonlocal next_row
        kids = children.get(i, [])
        if kids:
            placed = [place(k) for k in kids]
            ys[i] = (placed[0] + placed[-1]) / 2
        else:
            ys[i], next_row = next_row, next_row + 1
        return ys[i]

    for root in children.get(None, []):
        place(root)
    return ys


def _draw_tree(ax: Axes, nodes: list[PrefixNode], ys: list[float], colors: dict[str, str], width: float,
               height: float, font: float) -> None:
    ax.set_xlim(-0.2, width - 0.2)
    ax.set_ylim(height - 0.9, -0.9)
    ax.set_aspect("equal")
    ax.set_anchor("NW")
    ax.axis("off")
    if not nodes:
        ax.text(0, 0, "no block was registered (is prefix caching on?)", fontsize=9, va="top", color=_EVICTED_INK)
        return
    roots = [i for i, n in enumerate(nodes) if n.parent is None]
    root_y = (min(ys[i] for i in roots) + max(ys[i] for i in roots)) / 2 * _ROW
    ax.text(0.45, root_y, "root\n(no tokens)", ha="center", va="center", fontsize=8 * font, color="#444444",
            bbox=dict(boxstyle="circle,pad=0.35", fc="white", ec="#444444"))
    for i, n in enumerate(nodes):
        x, y = _left(n), ys[i] * _ROW
        px, py = (_left(nodes[n.parent]) + _BOX_W, ys[n.parent] * _ROW) if n.parent is not None else (0.95, root_y)
        ax.plot([px, x], [py, y], color="#999999", lw=1.0, zorder=1)
        _draw_node(ax, n, x, y, colors[n.request_id], font)


def _left(node: PrefixNode) -> float:
    return 1.3 + node.depth * _COLUMN


def _draw_node(ax: Axes, n: PrefixNode, x: float, y: float, color: str, font: float) -> None:
    evicted = n.evicted is not None
    face, ink = (_EVICTED_FACE, _EVICTED_INK) if evicted else (_pale(color), _INK)
    # An evicted block keeps the colour of the request that computed it, on a dashed outline.
    outline = dict(boxstyle="round,pad=0,rounding_size=0.08", zorder=2)
    ax.add_patch(FancyBboxPatch((x, y - _BOX_H / 2), _BOX_W, _BOX_H, fc=face, ec=color, lw=1.3,
                                ls="--" if evicted else "-", gid="evicted" if evicted else "cached", **outline))
    if n.shared:  # the hatch on a patch of its own, so that it can be faint while the outline is not
        ax.add_patch(FancyBboxPatch((x, y - _BOX_H / 2), _BOX_W, _BOX_H, fc="none", ec=color, lw=0, hatch=_HATCH,
                                    alpha=0.35, gid="shared", **outline))
    shown = " ".join(map(str, n.tokens[:_MAX_TOKENS_SHOWN])) + (" …" if len(n.tokens) > _MAX_TOKENS_SHOWN else "")
    lines = ((-0.27, f"block {n.block_id}" + (f" (use {n.use})" if n.use > 1 else ""), dict(weight="bold")),
             (0.02, shown, dict(family="monospace", fontsize=7.5 * font)),
             (0.3, "1 hit" if n.hits == 1 else f"{n.hits} hits", dict(weight="bold" if n.hits else "normal")))
    for dy, text, extra in lines:
        ax.text(x + _BOX_W / 2, y + dy, text, **{"ha": "center", "va": "center", "fontsize": 8 * font, "color": ink,
                                                "zorder": 3, **extra},
                bbox=dict(boxstyle="round,pad=0.12", fc=face, ec="none", alpha=0.85))
    if evicted:
        ax.text(x + _BOX_W, y + _BOX_H / 2 + 0.06, f"evicted #{n.evicted}", ha="right", va="top",
                fontsize=7.5 * font, style="italic", color=_EVICTION_INK)


def _draw_hits(ax: Axes, hits: dict[str, int], colors: dict[str, str], fontsize: float) -> None:
    ids = list(hits)
    if not ids:
        ax.axis("off")
        return
    ax.barh(range(len(ids)), [hits[r] for r in ids], color=[colors[r] for r in ids], height=0.6)
    for row, r in enumerate(ids):
        ax.text(hits[r] + 0.08, row, str(hits[r]), va="center", fontsize=fontsize - 1)
    ax.set_yticks(range(len(ids)), ids, fontsize=fontsize)
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlim(0, max(list(hits.values()) + [1]) * 1.3)
    ax.xaxis.set_visible(False)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.set_title("blocks each request\ntook from the cache", fontsize=9)


def _pale(color: str) -> tuple[float, float, float]:
    return pale(color, 0.25)
