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
    "fork", "cow", "hit", "evict",  # sharing (lesson 08)
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
    """The pool after some event: who owns each block and which tokens fill it.

    ``owner[b]`` is a request id or None (free); ``tokens[b]`` the token ids written so far,
    which fill block ``b`` from its first slot (a block is only ever appended to);
    ``tables`` each live request's block table.
    """

    step: int
    owner: list[str | None]
    tokens: list[list[int]]
    tables: dict[str, list[int]]


def replay(trace: Trace) -> list[PoolSnapshot]:
    """The pool state at the end of every step: one snapshot per ``step`` event, and one for
    the step still open if anything happened in it."""
    owner: list[str | None] = [None] * trace.num_blocks
    tokens: list[list[int]] = [[] for _ in range(trace.num_blocks)]
    tables: dict[str, list[int]] = {}
    snapshots = []

    def snapshot(step: int) -> PoolSnapshot:
        return PoolSnapshot(step, list(owner), [list(t) for t in tokens], {r: list(t) for r, t in tables.items()})

    for event in trace.events:
        if event.kind == "step":
            snapshots.append(snapshot(event.step - 1))
        elif event.kind in ("alloc", "append"):
            table = tables.setdefault(event.request_id, [])
            table.extend(event.block_ids)
            for b in event.block_ids:
                owner[b], tokens[b] = event.request_id, []
            for i, token in enumerate(event.token_ids):
                pos = event.first_position + i
                tokens[table[pos // trace.block_size]].append(token)
        elif event.kind == "free":
            for b in tables.pop(event.request_id, []):
                owner[b], tokens[b] = None, []
    if not trace.events or trace.events[-1].kind != "step":
        snapshots.append(snapshot(trace.step))
    return snapshots
