"""Lesson 07: chunked prefill. In the scheduler (no model): a prompt longer than the step's
budget is computed in consecutive chunks; decodes keep going meanwhile (the Gantt chart of
the example trace shows it too); a step leaves at most one prompt unfinished, and only when
that prompt used up the rest of the budget. Through the engine: with chunking off, every
request's tokens equal its run alone, as they do with chunking on (test_l06_engine.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.request import Request
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.simulate import simulate_step
from nanoengine.viz import example_scheduler_trace, gantt_states
from nanoengine.viz.gantt import DECODE, PREFILL
from tests.engines import alone, drive, make_engine
from tests.test_l06_engine import NAME, _arrivals, requests

pytestmark = pytest.mark.l07


def _request(request_id: str, prompt_len: int, max_tokens: int) -> Request:
    prompt = [100 + i for i in range(prompt_len)]  # distinct ids, so a chunk's tokens say where they came from
    return Request(request_id, None, prompt, SamplingParams(max_tokens=max_tokens), frozenset(), 0.0)


def test_a_long_prompt_is_computed_in_budget_sized_chunks():
    scheduler = Scheduler(KVCacheManager(num_blocks=64, block_size=4), token_budget=16, max_num_seqs=4)
    request = _request("long", 50, 2)
    scheduler.add_request(request)
    chunks = []
    for _ in range(4):
        (s,) = simulate_step(scheduler).scheduled
        chunks.append(s)
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 2]
    assert [c.num_computed_tokens for c in chunks] == [0, 16, 32, 48]
    assert [c.sample for c in chunks] == [False, False, False, True]  # only the last chunk ends the prompt
    assert [t for c in chunks for t in c.token_ids] == request.prompt_token_ids


def test_decodes_keep_their_token_every_step_while_a_prompt_is_chunked():
    scheduler = Scheduler(KVCacheManager(num_blocks=64, block_size=4), token_budget=16, max_num_seqs=4)
    for request_id in ("a", "b"):
        scheduler.add_request(_request(request_id, 3, 40))
    simulate_step(scheduler)  # both prefilled; from now on each decodes one token per step
    scheduler.add_request(_request("long", 100, 1))
    for _ in range(7):  # 7 chunks of 16 - 2 = 14 tokens cover 98 of the 100
        plan = simulate_step(scheduler)
        sizes = {s.request_id: len(s.token_ids) for s in plan.scheduled}
        assert sizes == {"a": 1, "b": 1, "long": 14}
    assert {s.request_id: len(s.token_ids) for s in simulate_step(scheduler).scheduled} == {"a": 1, "b": 1, "long": 2}


def test_without_chunking_a_prompt_waits_until_it_fits_whole():
    scheduler = Scheduler(KVCacheManager(num_blocks=64, block_size=4), token_budget=32, max_num_seqs=4,
                          enable_chunked_prefill=False)
    for request_id, max_tokens in (("a", 3), ("b", 5)):
        scheduler.add_request(_request(request_id, 2, max_tokens))
    simulate_step(scheduler)
    scheduler.add_request(_request("long", 31, 1))  # 31 > 32 - 2 running decodes
    waited = 0
    while True:
        plan = simulate_step(scheduler)
        if any(s.request_id == "long" for s in plan.scheduled):
            break
        waited += 1
    assert waited >= 1
    (s,) = [s for s in plan.scheduled if s.request_id == "long"]
    assert len(s.token_ids) == 31 and s.sample


@given(
    arrivals=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=6),
    budget=st.integers(4, 24),
    num_blocks=st.integers(12, 40),
)
def test_at_most_one_unfinished_prompt_chunk_per_step(arrivals, budget, num_blocks):
    scheduler = Scheduler(KVCacheManager(num_blocks, block_size=4), token_budget=budget, max_num_seqs=4)
    pending, step = sorted((t, f"r{i}", p, o) for i, (t, p, o) in enumerate(arrivals)), 0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt_len, max_tokens = pending.pop(0)
            scheduler.add_request(_request(request_id, prompt_len, max_tokens))
        plan = simulate_step(scheduler)
        assert plan.num_batched_tokens <= budget
        partial = [s for s in plan.scheduled if not s.sample]
        assert len(partial) <= 1, "two prompts left unfinished in one step"
        if partial:
            assert plan.scheduled[-1] is partial[0], "a partial chunk is the step's last"
            assert plan.num_batched_tokens == budget, "a prompt was cut although budget was left"
        step += 1
        assert step < 1000, "requests starved"


def test_the_example_trace_decodes_while_a_long_prompt_is_chunked():
    trace, budget = example_scheduler_trace()
    data = gantt_states(trace)
    long = next(i for i, n in enumerate(data.prompt_lens) if n > budget)
    steps = [s for s, state in enumerate(data.states[long]) if state == PREFILL]
    assert len(steps) >= 2 and all(c <= budget for c in data.chunk_sizes[long])
    for step in steps:
        decoding = [row[step] for row in data.states if row[step] == DECODE]
        assert decoding, f"nobody decoded in step {step} while the long prompt was prefilled"
        assert data.total_tokens_per_step()[step] <= budget


@given(drawn=requests)
def test_without_chunked_prefill_the_engine_equals_alone(drawn, ours):
    loaded = ours(NAME)
    arrivals = _arrivals(drawn)
    finished = drive(make_engine(loaded, chunked=False), arrivals)
    for _, request_id, prompt, params in arrivals:
        assert finished[request_id] == alone(loaded, prompt, params)
