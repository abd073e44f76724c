"""Lesson 03: the block pool, the KV cache's allocator.

The KV memory is cut into ``num_blocks`` blocks of ``block_size`` tokens each, allocated
once at start-up (the tensors live in the worker; this module only hands out block ids).
A request holds a list of blocks that need not be adjacent, so memory is taken one block
at a time as the request grows, never reserved for a length it may not reach.
"""

from __future__ import annotations

import collections
import dataclasses


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than are free; the caller should have checked first."""


@dataclasses.dataclass(slots=True)
class KVBlock:
    """One block's bookkeeping: ``ref_cnt`` counts the block tables that hold it."""

    block_id: int
    ref_cnt: int = 0


class BlockPool:
    """Hands out and takes back block ids.

    Invariants: a block is in the free queue exactly when its ``ref_cnt`` is 0; free +
    used == ``num_blocks``; no block is ever handed out twice without being freed.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: collections.deque[int] = collections.deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (reference count 1 each), oldest-freed first."""
        # BEGIN SOLUTION L03.T1
        if count > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self.free_queue)} free")
        block_ids = [self.free_queue.popleft() for _ in range(count)]
        for block_id in block_ids:
            self.blocks[block_id].ref_cnt = 1
        return block_ids
        # END SOLUTION

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
