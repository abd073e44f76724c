"""The engine's event recorder: what happened to which blocks, step by step.

A trace is plain data (no torch): an append-only list of :class:`TraceEvent`. The cache
manager records allocations, appends and frees into it when given one; the scheduler
records arrivals, each step's scheduled chunks, preemptions and finishes; lesson 08 adds
fork, copy-on-write, prefix hits and evictions. ``nanoengine.viz`` replays a
trace into pictures, and :func:`replay` rebuilds the block pool's state at any step.
"""

from __future__ import annotations

import dataclasses

EVENT_KINDS = (
    "arrive", "schedule", "finish",  # a request's life (lesson 06): token_ids = prompt / computed chunk
    "alloc", "append", "free",  # blocks (lesson 03)
    "fork", "cow", "hit", "cache", "evict",  # sharing (lesson 08)
    "truncate",  # speculation (lesson 10): rejected guesses' blocks given back, accepted tokens placed
    "slide",  # sliding window (lesson 16): blocks fallen out of the window given back
    "preempt", "step",
)


@dataclasses.dataclass(frozen=True, slots=True)
class TraceEvent:
    """One event. ``block_ids``: the blocks it concerns (new ones for alloc/append);
    ``token_ids``: the tokens it placed (alloc/append), in order from ``first_position``."""

    step: int
    kind: str
    request_id: str | None = None
    block_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    first_position: int = 0


@dataclasses.dataclass(slots=True)
class Trace:
    """Events in order; ``step`` counts engine steps (``next_step`` records a ``step`` event).

    ``num_blocks`` and ``block_size`` describe the pool the events refer to.
    """

    num_blocks: int
    block_size: int
    events: list[TraceEvent] = dataclasses.field(default_factory=list)
    step: int = 0

    def record(self, kind: str, request_id: str | None = None, block_ids=(), token_ids=(), first_position: int = 0) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown trace event {kind!r}")
        self.events.append(TraceEvent(self.step, kind, request_id, tuple(block_ids), tuple(token_ids), first_position))

    def next_step(self) -> None:
        self.step += 1
        self.record("step")


@dataclasses.dataclass(slots=True)
class PoolSnapshot:
    """The pool after some event: who holds each block and which tokens fill it.

    ``owner[b]`` is the request that first took block ``b`` (None: free); ``ref_cnt[b]``
    how many tables hold it (above 1: shared, lesson 08); ``tokens[b]`` the token ids
    written so far, which fill it from its first slot (a block is only ever appended to);
    ``cached[b]``: it caches a prefix, so its tokens outlive its last holder until it is
    evicted; ``tables`` each live request's block table (None where a block fell out of its
    sliding window, lesson 16).
    """

    step: int
    owner: list[str | None]
    tokens: list[list[int]]
    tables: dict[str, list[int | None]]
    ref_cnt: list[int]
    cached: list[bool]


def replay(trace: Trace) -> list[PoolSnapshot]:
    """The pool state at the end of every step: one snapshot per ``step`` event, and one for
    the step still open if anything happened in it."""
    n = trace.num_blocks
    owner: list[str | None] = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    tables: dict[str, list[int]] = {}
    ref_cnt, cached = [0] * n, [False] * n
    snapshots = []

    def snapshot(step: int) -> PoolSnapshot:
        return PoolSnapshot(
            step, list(owner), [list(t) for t in tokens], {r: list(t) for r, t in tables.items()}, list(ref_cnt), list(cached)
        )

    def hold(request_id: str, block_ids) -> None:
        for b in block_ids:
            ref_cnt[b] += 1
            owner[b] = owner[b] or request_id

    def release(b: int) -> None:
        ref_cnt[b] -= 1
        if ref_cnt[b] == 0:
            owner[b] = None
            if not cached[b]:
                tokens[b] = []

    for event in trace.events:
        kind, blocks = event.kind, event.block_ids
        if kind == "step":
            snapshots.append(snapshot(event.step - 1))
        elif kind in ("alloc", "append"):
            table = tables.setdefault(event.request_id, [])
            table.extend(blocks)
            for b in blocks:
                owner[b], tokens[b], ref_cnt[b] = event.request_id, [], 1
            for i, token in enumerate(event.token_ids):
                pos = event.first_position + i
                tokens[table[pos // trace.block_size]].append(token)
        elif kind in ("hit", "fork"):
            tables.setdefault(event.request_id, []).extend(blocks)
            hold(event.request_id, blocks)
        elif kind == "cow":
            shared, own = blocks
            table = tables[event.request_id]
            table[table.index(shared)] = own
            ref_cnt[shared] -= 1
            owner[own], tokens[own], ref_cnt[own] = event.request_id, list(tokens[shared]), 1
        elif kind == "truncate":
            table = tables[event.request_id]
            for b in blocks:
                table.remove(b)
                owner[b], tokens[b], ref_cnt[b] = None, [], 0
            for i, token in enumerate(event.token_ids):
                pos = event.first_position + i
                tokens[table[pos // trace.block_size]].append(token)
        elif kind == "cache":
            cached[blocks[0]] = True
        elif kind == "evict":
            cached[blocks[0]], tokens[blocks[0]] = False, []
        elif kind == "slide":
            table = tables[event.request_id]
            for b in blocks:
                table[table.index(b)] = None
                release(b)
        elif kind == "free":
            for b in tables.pop(event.request_id, []):
                if b is not None:
                    release(b)
    if not trace.events or trace.events[-1].kind != "step":
        snapshots.append(snapshot(trace.step))
    return snapshots
