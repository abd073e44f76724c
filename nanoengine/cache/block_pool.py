"""Lesson 03: the block pool, the KV cache's allocator (lesson 08 teaches it to remember).

The KV memory is cut into ``num_blocks`` blocks of ``block_size`` tokens each, allocated
once at start-up (the tensors live in the worker; this module only hands out block ids).
A request holds a list of blocks that need not be adjacent, so memory is taken one block
at a time as the request grows, never reserved for a length it may not reach.

Lesson 08: a full block can be *cached* under the hash of its prefix. When the last table
holding it lets go, it goes back to the free queue but keeps its hash and its K/V, so a
later request with the same prefix can take it back (a *hit*). Only when a free block is
handed out for new tokens does it forget what it held (an *eviction*). The free queue is
in order of release, so the least recently used cached block is evicted first.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

from nanoengine.cache.prefix_hash import BlockHash
from nanoengine.trace import Trace


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than are free; the caller should have checked first."""


@dataclasses.dataclass(slots=True)
class KVBlock:
    """One block's bookkeeping: ``ref_cnt`` counts the block tables that hold it;
    ``block_hash`` names the prefix it caches (None: not cached, lesson 08)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class FreeBlockQueue:
    """Free block ids, oldest release first, with removal from the middle in O(1).

    A ``deque`` cannot take a block out of its middle cheaply; a prefix-cache hit on a free
    block must (lesson 08). An ordered dict keyed by block id can.
    """

    def __init__(self, block_ids: range) -> None:
        self._ids: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(block_ids)

    def popleft(self) -> int:
        return self._ids.popitem(last=False)[0]

    def append(self, block_id: int) -> None:
        self._ids[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._ids[block_id]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._ids

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)


class BlockPool:
    """Hands out and takes back block ids, and remembers cached prefixes.

    Invariants: a block is in the free queue exactly when its ``ref_cnt`` is 0; free +
    used == ``num_blocks``; no block is ever handed out twice without being freed;
    ``cached[h] == b`` exactly when ``blocks[b].block_hash == h``.
    """

    def __init__(self, num_blocks: int, trace: Trace | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self.trace = trace

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-unused ones included."""
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (reference count 1 each), oldest-freed first."""
        # BEGIN SOLUTION L03.T1
        if count > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self.free_queue)} free")
        block_ids = [self.free_queue.popleft() for _ in range(count)]
        for block_id in block_ids:
            self.blocks[block_id].ref_cnt = 1
        # END SOLUTION
        for block_id in block_ids:
            self._evict(block_id)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds returns to the free queue."""
        # BEGIN SOLUTION L03.T1
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt < 1:
                raise ValueError(f"block {block_id} is already free")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block_id)
        # END SOLUTION

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block caching this prefix, if one still does."""
        return self.cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """One more table holds each of these cached blocks (a hit, or a fork)."""
        # BEGIN SOLUTION L08.T2
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self.free_queue.remove(block_id)
            block.ref_cnt += 1
        # END SOLUTION

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Remember that ``block_id`` (full, written) holds the prefix named ``block_hash``.

        Returns False, changing nothing, when another block already caches that prefix
        (two requests computed the same block at once): one copy is enough.
        """
        if block_hash in self.cached or self.blocks[block_id].block_hash is not None:
            return False
        self.cached[block_hash] = block_id
        self.blocks[block_id].block_hash = block_hash
        return True

    def _evict(self, block_id: int) -> None:
        """A block handed out for new tokens forgets the prefix it cached."""
        block = self.blocks[block_id]
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        block.block_hash = None
        if self.trace is not None:
            self.trace.record("evict", None, [block_id])
