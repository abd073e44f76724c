"""Lesson 09's picture of beam search: the final beams as a trie, with what was pruned on the way.

The final beams' generated tokens are merged into a trie (beams that share a prefix share a
path), drawn left to right one column per step. Each edge carries its token and the
log-probability the parent beam gave it; each leaf its beam's rank (best first) and
cumulative log-probability. Every other token proposed at a node, which no final beam
kept, is drawn as a faded stub below the node's children: the search looked at it and let
it go. :func:`beam_trie` builds the trie (the testable part); :func:`beam_tree` only draws it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nanoengine.outputs import Logprob
from nanoengine.sampling.beam_search import BeamSearchOutput
from nanoengine.viz.style import COLORS

_STUB_ROW = 0.5  # a pruned proposal's share of the height, in rows (a leaf takes 1)
_STUB_LEN = 0.42  # a stub's length, in columns
_KEPT, _PRUNED, _INK = COLORS["prompt"], "#B5B5B5", "#222222"
_ROW_INCHES, _COLUMN_INCHES = 0.36, 1.85


@dataclasses.dataclass(slots=True)
class BeamNode:
    """A node of the trie: the generated tokens from the root to here are a prefix of at least
    one final beam. ``token``/``logprob``: the edge from ``parent`` (None at the root, which
    stands for the prompt); ``children`` index the nodes one token longer, in order of the
    best beam through each; ``pruned``: the tokens proposed here that no final beam took,
    most likely first; ``ranks``: the ranks (1 = best) of the final beams that end here, with
    their ``cum_logprob``.
    """

    token: int | None
    logprob: Logprob | None
    parent: int | None
    depth: int
    children: list[int] = dataclasses.field(default_factory=list)
    pruned: list[tuple[int, Logprob]] = dataclasses.field(default_factory=list)
    ranks: list[int] = dataclasses.field(default_factory=list)
    cum_logprob: float | None = None


def beam_trie(output: BeamSearchOutput, prompt_len: int) -> list[BeamNode]:
    """The trie of ``output``'s beams (their tokens after the first ``prompt_len``); node 0 is the root.

    A beam's ``logprobs[i]`` holds every token proposed at its ``i``-th generated position
    from the beam it extended; beams through the same node got their proposals from the
    same parent, so a node's proposals are read from whichever beam passes first.
    """
    nodes = [BeamNode(None, None, None, 0)]
    proposals: dict[int, dict[int, Logprob]] = {}
    for rank, sequence in enumerate(output.sequences, 1):
        here = 0
        for position, token in enumerate(sequence.tokens[prompt_len:]):
            proposed = sequence.logprobs[position] if position < len(sequence.logprobs) else {}
            proposals.setdefault(here, dict(proposed))
            child = next((c for c in nodes[here].children if nodes[c].token == token), None)
            if child is None:
                child = len(nodes)
                nodes.append(BeamNode(token, proposals[here].get(token), here, position + 1))
                nodes[here].children.append(child)
            here = child
        nodes[here].ranks.append(rank)
        nodes[here].cum_logprob = sequence.cum_logprob
    for index, proposed in proposals.items():
        kept = {nodes[c].token for c in nodes[index].children}
        nodes[index].pruned = sorted(((t, lp) for t, lp in proposed.items() if t not in kept),
                                     key=lambda item: (-item[1].logprob, item[0]))
    return nodes


def beam_tree(output: BeamSearchOutput, prompt_len: int, labels: Callable[[int], str] | None = None,
              title: str | None = None) -> Figure:
    """The beam search of ``output`` as a trie growing to the right, one column per step (see
    :func:`beam_trie`). ``labels`` spells a token id (default: the ``decoded_token`` of its
    logprob where there is one, else the id); with it, the root shows the prompt's words.
    """
    nodes = beam_trie(output, prompt_len)
    ys, stub_ys, height = _layout(nodes)
    steps = max(n.depth for n in nodes)
    width = 1.6 + (steps + 1.2) * _COLUMN_INCHES
    fig = Figure(figsize=(width, height * _ROW_INCHES + 1.3))
    ax = fig.add_axes((0.15 / width, 0.55 / fig.get_figheight(), 1 - 0.3 / width, 1 - 1.15 / fig.get_figheight()))
    ax.set_xlim(-0.75, steps + 1.25)
    ax.set_ylim(height, -0.4)
    ax.axis("off")

    def spell(token: int, logprob: Logprob | None) -> str:
        if labels is not None:
            return labels(token)
        return logprob.decoded_token if logprob is not None and logprob.decoded_token else str(token)

    prompt = output.sequences[0].tokens[:prompt_len] if output.sequences else []
    root = " ".join(labels(t) for t in prompt) if labels is not None else f"prompt\n({prompt_len} tokens)"
    ax.text(-0.08, ys[0], root, ha="right", va="center", fontsize=9, weight="bold", color=_INK,
            bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=_INK))
    for i, node in enumerate(nodes):
        for (token, logprob), y in zip(node.pruned, stub_ys[i]):
            ax.plot([node.depth, node.depth + _STUB_LEN], [ys[i], y], color=_PRUNED, lw=0.9, zorder=1, gid="pruned")
            ax.text(node.depth + _STUB_LEN + 0.03, y, f"{spell(token, logprob)} {_number(logprob.logprob)}", ha="left",
                    va="center", fontsize=7, color="#9A9A9A")
        if node.parent is not None:
            _draw_edge(ax, node, ys[node.parent], ys[i], spell(node.token, node.logprob))
        if node.ranks:
            ranks = ", ".join(f"#{r}" for r in node.ranks)
            ax.text(node.depth + 0.08, ys[i], f"{ranks}  cum logprob {_number(node.cum_logprob)}", ha="left",
                    va="center", fontsize=8.5, weight="bold", color=_INK)
    ax.scatter([n.depth for n in nodes], ys, s=22, color=_KEPT, zorder=3)
    if title is None:
        beams = len(output.sequences)
        title = (f"Beam search: the {beams} final beam{'s' if beams != 1 else ''} after {steps} steps, "
                 f"and the proposals pruned on the way")
    ax.set_title(title, fontsize=11, loc="left")
    fig.text(0.15 / width, 0.15 / fig.get_figheight(),
             "Edges: the token kept and its log-probability under the beam it extends. Grey stubs: tokens proposed "
             "there that no final beam kept. #k: the beam's rank, best first.", fontsize=8, color="#444444")
    return fig


def _draw_edge(ax: Axes, node: BeamNode, y0: float, y1: float, label: str) -> None:
    x0, x1 = node.depth - 1, node.depth
    ax.plot([x0, x1], [y0, y1], color=_KEPT, lw=1.6, zorder=2, gid="kept")
    logprob = f" {_number(node.logprob.logprob)}" if node.logprob is not None else ""
    # Near the child, where edges have spread apart, and over the line so it stays readable.
    ax.text(x1 - 0.06, y1 - 0.08, f"{label}{logprob}", ha="right", va="bottom", fontsize=8.5, color=_INK,
            zorder=4, bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.9))


def _layout(nodes: list[BeamNode]) -> tuple[list[float], list[list[float]], float]:
    """Rows for the nodes and their stubs: each node's children's subtrees one below the other,
    then a band of short rows for its pruned proposals; the node sits level with the middle of
    all of them, so kept edges and stubs never cross. Returns node rows, stub rows per node and
    the total height."""
    ys = [0.0] * len(nodes)
    stub_ys: list[list[float]] = [[] for _ in nodes]

    def place(i: int, top: float) -> float:
        """Lay out node ``i``'s subtree from row ``top``; returns the row below it."""
        node, cursor, ends = nodes[i], top, []
        for child in node.children:
            cursor = place(child, cursor)
            ends.append(ys[child])
        for _ in node.pruned:
            stub_ys[i].append(cursor + _STUB_ROW / 2)
            cursor += _STUB_ROW
        if not node.children and not node.pruned:
            cursor += 1.0
        ends += stub_ys[i]
        ys[i] = (ends[0] + ends[-1]) / 2 if ends else top + 0.5
        return cursor

    height = place(0, 0.0)
    return ys, stub_ys, height


def _number(value: float) -> str:
    return f"{value:.2f}".replace("-", "\u2212")  # a typographic minus
