"""Lesson 03: block tables, one per request, grown on demand over the block pool.

Token ``p`` of a request lives in block ``table[p // block_size]`` at offset
``p % block_size``; its *slot* (the row in the flattened K/V tensors) is
``table[p // block_size] * block_size + p % block_size``. A request's table always holds
exactly ``ceil(num_tokens / block_size)`` blocks, so at most one block per request is
partly empty: the only memory paging wastes.

Lesson 08 lets tables share blocks. With prefix caching, every full block is registered
under its chained hash (``prefix_hash``), and a new request starts its table with the
cached blocks of its longest cached prefix. ``fork`` gives a new sequence (parallel
sampling, ``n > 1``) its parent's table with every block shared; the first write into a
shared, partly filled block copies it first (*copy-on-write*): the copies to make are
handed to the worker in the step's plan.

Lesson 10 lets a request hold *lookahead* slots past its verified tokens for guessed tokens
(speculative decoding); once the guesses are checked, ``truncate`` keeps the accepted ones'
slots and gives the rest back. Guesses are never cached.

Lesson 14 gives a request *extra keys* (its LoRA adapter), which take part in every hash
of its blocks: the same tokens computed under another adapter have other K/V, so they must
never be served from the cache.

Lesson 16: when every layer of the model attends through a sliding window of ``W`` tokens,
a block wholly before the window of the request's next token is never read again. The
manager gives it back at once and marks its table entry :data:`OUT_OF_WINDOW` (positions
keep indexing the table as before), so a request holds about ``W / block_size + 1`` blocks
however long it grows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from nanoengine.cache.block_pool import BlockPool
from nanoengine.cache.prefix_hash import BlockHash, block_hashes
from nanoengine.trace import Trace

# The table entry of a block given back because it fell out of the sliding window (lesson 16).
OUT_OF_WINDOW = -1


def slot_for(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The flat K/V row where the token at ``position`` is stored."""
    # BEGIN SOLUTION L03.T3
    return block_table[position // block_size] * block_size + position % block_size
    # END SOLUTION


def num_blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many whole blocks a KV memory budget buys."""
    return budget_bytes // (bytes_per_token * block_size)


@dataclasses.dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups: one per admitted request (fresh or back from preemption).

    ``queried_blocks``: full blocks looked up (all but the last token of the sequence);
    ``hit_blocks``: those found cached, whose tokens were not computed again.
    """

    requests: int = 0
    queried_blocks: int = 0
    hit_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0


class KVCacheManager:
    """Decides which blocks each request's tokens go in.

    Invariants: for every live request, ``len(table) == ceil(num_tokens / block_size)``;
    a block's ``ref_cnt`` equals the number of tables holding it; a block that receives
    tokens in a step is held by exactly one table (no writable block is shared); freeing a
    request drops its references, and blocks nobody holds return to the pool (cached ones
    keep their prefix until evicted). With a ``sliding_window`` (every layer windowed,
    lesson 16), entries before the window are :data:`OUT_OF_WINDOW` and hold no block.
    """

    def __init__(
        self, num_blocks: int, block_size: int, trace: Trace | None = None, enable_prefix_caching: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1; got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, trace)
        self.tables: dict[str, list[int]] = {}
        self.num_tokens: dict[str, int] = {}
        self.hashes: dict[str, list[BlockHash]] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self.pending_copies: list[tuple[int, int]] = []
        self.lookahead: dict[str, int] = {}  # slots held past the verified tokens (lesson 10)
        self.extra_keys: dict[str, tuple] = {}  # keys in every block hash of a request (lesson 14)
        self.sliding_window = sliding_window
        self.trace = trace

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, request_id: str, total_tokens: int) -> int:
        """New blocks ``request_id`` needs to hold ``total_tokens`` tokens."""
        have = len(self.tables.get(request_id, ()))
        return max(0, math.ceil(total_tokens / self.block_size) - have)

    def get_computed_blocks(self, token_ids: Sequence[int], extra_keys: tuple = ()) -> list[int]:
        """The cached blocks of the longest cached prefix of ``token_ids``, in order.

        Never the whole sequence: its last token must still run through the model, which
        is what produces the logits of the next one.
        """
        if not self.enable_prefix_caching:
            return []
        # BEGIN SOLUTION L08.T2
        computed = []
        max_blocks = (len(token_ids) - 1) // self.block_size
        for block_hash in block_hashes(token_ids[: max_blocks * self.block_size], self.block_size, extra_keys):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            computed.append(block_id)
        return computed
        # END SOLUTION

    def allocate_slots(
        self, request_id: str, token_ids: Sequence[int], computed_blocks: Sequence[int] = (),
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for all of ``token_ids`` (the request's whole sequence so far), plus
        ``num_lookahead_tokens`` slots after them for speculated tokens (lesson 10).

        A new request's table starts with ``computed_blocks`` (its prefix-cache hit), then
        grows by the blocks the new tokens need; a shared block about to be written is
        copied first. Lookahead slots are never cached: their tokens are guesses until
        verified. Returns False and changes nothing when the pool has too few free blocks
        (the scheduler then waits or preempts).
        """
        is_new = request_id not in self.tables
        if computed_blocks and not is_new:
            raise ValueError(f"request {request_id!r} already has blocks; cached blocks only start a table")
        start = self.num_tokens.get(request_id, len(computed_blocks) * self.block_size)
        end = len(token_ids) + num_lookahead_tokens
        table = self.tables.get(request_id, [])
        needed = max(0, math.ceil(end / self.block_size) - len(table) - len(computed_blocks))
        copy = self._shared_block_to_write(table, start, end)
        revived = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if needed + (copy is not None) > self.pool.num_free_blocks - revived:
            return False
        table = self.tables.setdefault(request_id, [])
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            table.extend(computed_blocks)
            self._record("hit", request_id, computed_blocks)
        if copy is not None:
            self._copy_on_write(request_id, table, copy)
        # BEGIN SOLUTION L03.T2
        new_blocks = self.pool.allocate(needed)
        table.extend(new_blocks)
        self.num_tokens[request_id] = end
        # END SOLUTION
        self._record("alloc" if is_new else "append", request_id, new_blocks, token_ids[start:], start)
        if num_lookahead_tokens:
            self.lookahead[request_id] = num_lookahead_tokens
        if self.enable_prefix_caching:
            self._cache_full_blocks(request_id, token_ids, self.extra_keys.get(request_id, ()))
        if self.sliding_window is not None:
            self._release_out_of_window(request_id, table, start)
        return True

    def _release_out_of_window(self, request_id: str, table: list[int], first_query: int) -> None:
        """Give back the blocks before the window of this step's first new token."""
        released = slide_window(table, first_query, self.sliding_window, self.block_size)
        if released:
            self.pool.free(released)
            self._record("slide", request_id, released)

    def set_extra_keys(self, request_id: str, extra_keys: tuple) -> None:
        """Make ``extra_keys`` part of every block hash of ``request_id`` (its LoRA adapter,
        lesson 14), for as long as it lives: they outlast preemption, and a fork's children
        inherit them. Call :meth:`forget` when the request is gone."""
        if extra_keys:
            self.extra_keys[request_id] = extra_keys

    def forget(self, request_id: str) -> None:
        """The request is gone for good (finished, aborted or forked): drop its extra keys."""
        self.extra_keys.pop(request_id, None)

    def _shared_block_to_write(self, table: list[int], start: int, end: int) -> int | None:
        """The index in ``table`` of a shared, partly filled block that tokens ``start..end``
        would write into, if any. Only a partly filled block is ever written, so at most one."""
        if end <= start or start % self.block_size == 0:
            return None
        index = start // self.block_size
        return index if self.pool.blocks[table[index]].ref_cnt > 1 else None

    def _copy_on_write(self, request_id: str, table: list[int], index: int) -> None:
        """Give ``request_id`` its own copy of the shared block at ``table[index]``."""
        # BEGIN SOLUTION L08.T3
        shared = table[index]
        (own,) = self.pool.allocate(1)
        self.pending_copies.append((shared, own))
        self.pool.free([shared])
        table[index] = own
        # END SOLUTION
        self._record("cow", request_id, (shared, own))

    def _cache_full_blocks(self, request_id: str, token_ids: Sequence[int], extra_keys: tuple) -> None:
        """Register every block that ``token_ids`` fill, under its chained hash."""
        known = self.hashes.setdefault(request_id, [])
        first_new = len(known)
        if len(token_ids) // self.block_size == first_new:
            return  # no block filled since the last call (most decode steps): nothing to copy or hash
        table = self.tables[request_id]
        known[:] = block_hashes(token_ids, self.block_size, extra_keys, known)
        for index in range(first_new, len(known)):
            if self.pool.cache(table[index], known[index]):
                self._record("cache", request_id, [table[index]])

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give ``child_id`` the parent's table, every block shared (no copy until a write)."""
        if child_id in self.tables:
            raise ValueError(f"request id {child_id!r} already has blocks")
        table = list(self.tables[parent_id])
        self.pool.touch(_held(table))
        self.tables[child_id] = table
        self.num_tokens[child_id] = self.num_tokens[parent_id]
        if parent_id in self.hashes:
            self.hashes[child_id] = list(self.hashes[parent_id])
        self.set_extra_keys(child_id, self.extra_keys.get(parent_id, ()))
        self._record("fork", child_id, table)

    def truncate(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Keep the slots of ``token_ids`` (the request's verified sequence) and give up the
        rest of its lookahead slots (lesson 10).

        A speculating request holds slots for its guessed tokens; once the rejected ones are
        known, their slots go: the table keeps ``ceil(len(token_ids) / block_size)`` blocks
        and the others return to the pool. Rejected K/V left in the kept, partly filled block
        are overwritten by the next tokens, which is safe because only full blocks of
        verified tokens are ever cached.
        """
        have, num_tokens = self.num_tokens[request_id], len(token_ids)
        verified = have - self.lookahead.get(request_id, 0)
        if not verified <= num_tokens <= have:  # below: a cached block could be cut and overwritten
            raise ValueError(f"request {request_id!r} has {verified} verified tokens and {have} slots; "
                             f"it can keep between the two, not {num_tokens}")
        # BEGIN SOLUTION L10.T3
        table = self.tables[request_id]
        keep = math.ceil(num_tokens / self.block_size)
        released = table[keep:]  # the latest blocks: never out of a sliding window
        del table[keep:]
        self.pool.free(released[::-1])
        self.num_tokens[request_id] = num_tokens
        # END SOLUTION
        self.lookahead.pop(request_id, None)
        self._record("truncate", request_id, released, token_ids[verified:], verified)  # the accepted guesses

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies the worker must make before the next step."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def block_table(self, request_id: str) -> list[int]:
        return self.tables[request_id]

    def free(self, request_id: str) -> None:
        """Drop every block reference of a finished (or preempted) request.

        The table is released last block first, so when the blocks are cached, a prefix's
        tail is evicted before its head (the head is the part more requests share).
        """
        table = _held(self.tables.pop(request_id))
        del self.num_tokens[request_id]
        self.hashes.pop(request_id, None)
        self.lookahead.pop(request_id, None)
        self.pool.free(table[::-1])
        self._record("free", request_id, table)

    def _record(self, kind: str, request_id: str, block_ids, token_ids=(), first_position: int = 0) -> None:
        if self.trace is not None:
            self.trace.record(kind, request_id, block_ids, token_ids, first_position)


def slide_window(table: list[int], first_query: int, window: int, block_size: int) -> list[int]:
    """Mark, in place, the entries of ``table`` wholly before the window of the token at
    position ``first_query`` as :data:`OUT_OF_WINDOW`, and return the blocks they held (to
    give back). That token, and every later one, sees keys from ``first_query - window + 1``
    on, so the blocks before that key's block are never read again."""
    # BEGIN SOLUTION L16.T5
    first_needed = max(0, first_query - window + 1) // block_size
    released = [block for block in table[:first_needed] if block != OUT_OF_WINDOW]
    table[:first_needed] = [OUT_OF_WINDOW] * first_needed
    return released
    # END SOLUTION


def _held(table: list[int]) -> list[int]:
    """The blocks a table holds: its entries but those given back out of the window."""
    return [block for block in table if block != OUT_OF_WINDOW]
