"""A small, fixed paging story for lesson 03's figures: no model, no torch, the same trace every time.

Three requests are admitted into a 32-block pool of 4-token blocks and decode in
lock-step, so their blocks interleave; one finishes and leaves holes; a fourth arrives
and takes blocks further along the free queue. Token ids encode the request (A's are
101, 102, ...; B's 201, ...) so a picture shows whose token sits in which slot.
"""

from __future__ import annotations

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.trace import Trace

NUM_BLOCKS, BLOCK_SIZE = 32, 4


def example_paging_manager() -> KVCacheManager:
    """The manager at the end of the story; its ``trace`` holds every step (7 snapshots).

    Ends with A, C and D live (13, 9 and 11 tokens: each has a partly filled last block)
    and B's four blocks free in the middle of the used ones.
    """
    manager = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, trace=Trace(NUM_BLOCKS, BLOCK_SIZE))
    sequences: dict[str, list[int]] = {}

    def admit(request_id: str, first_token: int, prompt_len: int) -> None:
        sequences[request_id] = list(range(first_token, first_token + prompt_len))
        assert manager.allocate_slots(request_id, sequences[request_id])

    def decode(*request_ids: str) -> None:
        for request_id in request_ids:
            sequences[request_id].append(sequences[request_id][-1] + 1)
            assert manager.allocate_slots(request_id, sequences[request_id])

    admit("A", 101, 7)
    admit("B", 201, 10)
    admit("C", 301, 3)
    for _ in range(3):
        manager.trace.next_step()
        decode("A", "B", "C")
    manager.trace.next_step()
    manager.free("B")
    admit("D", 401, 9)
    decode("A", "C")
    for _ in range(2):
        manager.trace.next_step()
        decode("A", "C", "D")
    return manager


def example_paging_trace() -> Trace:
    """The trace of :func:`example_paging_manager`, for figures and notebooks."""
    return example_paging_manager().trace
