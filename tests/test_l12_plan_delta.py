"""Lesson 12: the plan sent to the worker ranks carries only what changed, and each rank
rebuilds the driver's plan exactly from it."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.plan_delta import PlanDecoder, PlanEncoder
from tests.traffic import ARRIVALS, plain_request, scheduler_traffic

pytestmark = pytest.mark.l12


@given(arrivals=ARRIVALS, num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(4, 24), prefix_caching=st.booleans(), aborts=st.sets(st.integers(0, 30), max_size=4))
def test_every_rank_rebuilds_the_drivers_plan(arrivals, num_blocks, block_size, budget, prefix_caching, aborts):
    """Over random traffic with preemption (a small pool), prefix-cache hits, aborts and
    chunking, every decoded plan equals the driver's, pickled on the way as the executor sends it."""
    encoder, decoder = PlanEncoder(), PlanDecoder()
    for plan in scheduler_traffic(arrivals, num_blocks, block_size, budget, prefix_caching, aborts):
        rebuilt = decoder.decode(pickle.loads(pickle.dumps(encoder.encode(plan))))
        assert rebuilt == plan
        assert encoder.sent.keys() == decoder.requests.keys()


def test_a_decode_steps_message_does_not_grow_with_the_sequence():
    """Today's full plan grows with the prompt and output every step (quadratic over a
    request); the delta of a decode step stays the same size."""
    scheduler = Scheduler(KVCacheManager(64, 16), 64, max_num_seqs=1)
    scheduler.add_request(plain_request("a", list(range(40)), 400))
    encoder = PlanEncoder()
    sizes = []
    for step in range(300):
        plan = scheduler.schedule()
        delta = encoder.encode(plan)
        if step in (10, 290):
            sizes.append((len(pickle.dumps(plan)), len(pickle.dumps(delta))))
        scheduler.update_after_step(plan)
        scheduler.requests["a"].output_token_ids.append(1000 + step)  # ids that pickle at their full width
    (full_early, delta_early), (full_late, delta_late) = sizes
    assert full_late > full_early + 500
    assert delta_late <= delta_early + 8  # a new block id at most


def test_a_plan_naming_an_unknown_request_is_refused():
    scheduler = Scheduler(KVCacheManager(8, 4), 16, max_num_seqs=2)
    scheduler.add_request(plain_request("a", [1, 2, 3], 4))
    encoder = PlanEncoder()
    plan = scheduler.schedule()
    encoder.encode(plan)  # a rank that missed this first plan
    scheduler.update_after_step(plan)
    scheduler.requests["a"].output_token_ids.append(5)
    with pytest.raises(RuntimeError, match="never sent"):
        PlanDecoder().decode(encoder.encode(scheduler.schedule()))


def test_a_block_table_that_shrinks_or_changes_inside_is_rebuilt():
    """Rejected guesses give blocks back (lesson 10) and a shared block is copied on write
    (lesson 08): a table changes at its end, and may change anywhere."""
    from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput

    encoder, decoder = PlanEncoder(), PlanDecoder()
    params = SamplingParams()
    for step, table in enumerate([[1, 2, 3], [1, 2], [1, 2, 9, 10], [1, 7, 9], [4]]):
        scheduled = ScheduledRequest("a", [5], step, table, True, params, [], [1], [5] * step)
        plan = SchedulerOutput(step, [scheduled], [], [])
        assert decoder.decode(encoder.encode(plan)) == plan
