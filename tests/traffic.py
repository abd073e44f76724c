"""Random scheduler traffic without a model, for tests of what a step's plan feeds."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import strategies as st

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.request import Request, RequestStatus
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.output import SchedulerOutput
from nanoengine.scheduler.simulate import complete_step

# (arrival step, prompt, max_tokens) of each request
ARRIVALS = st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 5), min_size=1, max_size=20),
                              st.integers(1, 12)), min_size=1, max_size=8)


def plain_request(request_id: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(request_id, None, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset(), 0.0)


def scheduler_traffic(
    arrivals: list[tuple[int, list[int], int]], num_blocks: int, block_size: int, budget: int,
    prefix_caching: bool, aborts: set[int], steps: int = 60,
) -> Iterator[SchedulerOutput]:
    """The plans of ``steps`` engine steps over a pool of ``num_blocks`` (small: preemption),
    aborting the oldest running request at each step in ``aborts``. Each plan is yielded
    before its step's tokens are appended (as the runner sees it); the stand-in model
    samples ``step % 7``."""
    scheduler = Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching),
                          budget, max_num_seqs=3)
    pending = sorted(arrivals, key=lambda a: a[0])
    for step in range(steps):
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens = pending.pop(0)
            if len(prompt) + max_tokens <= num_blocks * block_size:
                scheduler.add_request(plain_request(f"r{step}-{len(pending)}", prompt, max_tokens))
        if step in aborts and scheduler.running:
            scheduler.finish_request(scheduler.running[0].request_id, RequestStatus.FINISHED_ABORTED)
        plan = scheduler.schedule()
        yield plan
        complete_step(scheduler, plan, step % 7)
