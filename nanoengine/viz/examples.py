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


# Lessons 06-07: (request id, arrival step, prompt length, output length). C's prompt is longer
# than a step's budget, so it is prefilled in chunks; the pool is too small for everyone's
# growth, so the newest running request is preempted once and recomputed later.
SCHEDULER_REQUESTS = (("A", 0, 5, 9), ("B", 0, 3, 4), ("C", 1, 18, 5), ("D", 4, 4, 6), ("E", 6, 6, 3))
SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE, SCHEDULER_TOKEN_BUDGET, SCHEDULER_MAX_NUM_SEQS = 9, 4, 8, 4
_SAMPLED_TOKEN = 7  # what the pretend model always samples


def example_scheduler_trace() -> tuple[Trace, int]:
    """A real :class:`~nanoengine.scheduler.Scheduler` over a real ``KVCacheManager``, driven the
    way ``LLMEngine.step`` drives it, with a pretend model that always samples the same token.

    Returns the trace and the step's token budget. No model, no torch, the same trace every time.
    """
    from nanoengine.request import Request
    from nanoengine.sampling_params import SamplingParams
    from nanoengine.scheduler import Scheduler
    from nanoengine.scheduler.simulate import simulate_step

    trace = Trace(SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE)
    scheduler = Scheduler(KVCacheManager(SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE, trace),
                          SCHEDULER_TOKEN_BUDGET, SCHEDULER_MAX_NUM_SEQS, trace=trace)
    pending = sorted(SCHEDULER_REQUESTS, key=lambda r: r[1])
    first_token = {rid: 100 * (i + 1) + 1 for i, (rid, *_) in enumerate(SCHEDULER_REQUESTS)}
    step = 0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[0][1] <= step:
            rid, _, prompt_len, output_len = pending.pop(0)
            prompt = list(range(first_token[rid], first_token[rid] + prompt_len))
            scheduler.add_request(Request(rid, None, prompt, SamplingParams(max_tokens=output_len, ignore_eos=True),
                                          frozenset(), float(step)))
        simulate_step(scheduler, _SAMPLED_TOKEN)
        step += 1
        if step > 200:
            raise RuntimeError("the example scheduler stopped making progress")
    return trace, SCHEDULER_TOKEN_BUDGET
