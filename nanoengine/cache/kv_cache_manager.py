"""Lesson 03: block tables, one per request, grown on demand over the block pool.

Token ``p`` of a request lives in block ``table[p // block_size]`` at offset
``p % block_size``; its *slot* (the row in the flattened K/V tensors) is
``table[p // block_size] * block_size + p % block_size``. A request's table always holds
exactly ``ceil(num_tokens / block_size)`` blocks, so at most one block per request is
partly empty: the only memory paging wastes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanoengine.cache.block_pool import BlockPool
from nanoengine.trace import Trace


def slot_for(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The flat K/V row where the token at ``position`` is stored."""
    # BEGIN SOLUTION L03.T3
    return block_table[position // block_size] * block_size + position % block_size
    # END SOLUTION


def num_blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many whole blocks a KV memory budget buys."""
    return budget_bytes // (bytes_per_token * block_size)


class KVCacheManager:
    """Decides which blocks each request's tokens go in.

    Invariants: for every live request, ``len(table) == ceil(num_tokens / block_size)``;
    a block belongs to at most one table (prefix sharing, lesson 08, relaxes this with
    reference counts); freeing a request returns all its blocks to the pool.
    """

    def __init__(self, num_blocks: int, block_size: int, trace: Trace | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1; got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}
        self.trace = trace

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, request_id: str, total_tokens: int) -> int:
        """New blocks ``request_id`` needs to hold ``total_tokens`` tokens."""
        have = len(self.tables.get(request_id, ()))
        return max(0, math.ceil(total_tokens / self.block_size) - have)

    def allocate_slots(self, request_id: str, token_ids: Sequence[int]) -> bool:
        """Make room for all of ``token_ids`` (the request's whole sequence so far).

        Grows the table by the blocks the new tokens need. Returns False and changes
        nothing when the pool has too few free blocks (the scheduler then waits or preempts).
        """
        # BEGIN SOLUTION L03.T2
        needed = self.blocks_needed(request_id, len(token_ids))
        if needed > self.pool.num_free_blocks:
            return False
        is_new = request_id not in self.tables
        table = self.tables.setdefault(request_id, [])
        new_blocks = self.pool.allocate(needed)
        table.extend(new_blocks)
        start = self.num_tokens.get(request_id, 0)
        self.num_tokens[request_id] = len(token_ids)
        # END SOLUTION
        if self.trace is not None:
            self.trace.record("alloc" if is_new else "append", request_id, new_blocks, token_ids[start:], start)
        return True

    def block_table(self, request_id: str) -> list[int]:
        return self.tables[request_id]

    def free(self, request_id: str) -> None:
        """Return every block of a finished (or preempted) request to the pool."""
        table = self.tables.pop(request_id)
        del self.num_tokens[request_id]
        self.pool.free(table)
        if self.trace is not None:
            self.trace.record("free", request_id, table)
