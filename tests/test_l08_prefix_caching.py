"""Lesson 08 through the engine on the tiny zoo: prefix caching changes no output and reports
its hits; parallel sampling (n > 1) computes the prompt once and shares its blocks.

The engine runs every task of the lesson (and lesson 06's first), so these count for the
lesson; test_l08_block_sharing.py tests each task alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.engine.inputs import Prompt
from nanoengine.sampling_params import SamplingParams
from tests.engines import alone, drive, drive_outputs, make_engine

pytestmark = pytest.mark.l08

NAME = "llama-gqa"

shared_prefix_requests = st.tuples(
    st.lists(st.integers(1, 319), min_size=0, max_size=20),  # the shared prefix
    st.lists(
        st.tuples(
            st.integers(0, 4),  # arrival step
            st.lists(st.integers(1, 319), min_size=1, max_size=6),  # own suffix
            st.integers(1, 8),  # max_tokens
            st.sampled_from([None, 5]),  # greedy, or seeded sampling
        ),
        min_size=1, max_size=4,
    ),
)


def _arrivals(drawn):
    prefix, requests = drawn
    return [
        (step, f"r{i}", prefix + suffix,
         SamplingParams(temperature=0.0 if seed is None else 0.8, seed=seed, max_tokens=n, min_tokens=n))
        for i, (step, suffix, n, seed) in enumerate(requests)
    ]


@given(drawn=shared_prefix_requests, block_size=st.sampled_from([1, 2, 4]), budget=st.sampled_from([None, 9]))
def test_prefix_caching_on_equals_off(drawn, block_size, budget, ours):
    loaded = ours(NAME)
    arrivals = _arrivals(drawn)
    on = drive(make_engine(loaded, block_size=block_size, budget=budget, prefix_caching=True), arrivals)
    off = drive(make_engine(loaded, block_size=block_size, budget=budget), arrivals)
    assert on == off


def test_reported_hits_are_the_shared_full_blocks(ours):
    engine = make_engine(ours(NAME), block_size=4, prefix_caching=True)
    prefix = list(range(1, 14))  # 13 tokens: three full blocks of 4
    greedy = SamplingParams(temperature=0, max_tokens=3)
    drive(engine, [(0, "first", prefix + [20], greedy)])
    stats = engine.kv_cache_manager.stats
    assert (stats.requests, stats.hit_blocks) == (1, 0)
    drive(engine, [(0, "second", prefix + [30, 31, 32, 33], greedy)])
    assert stats.requests == 2 and stats.hit_blocks == 3, "13 shared tokens are 3 full blocks"
    assert stats.queried_blocks == 3 + 4  # (14 - 1) // 4 for the first, (17 - 1) // 4 for the second


def test_equal_prefixes_admitted_in_the_same_step(ours):
    """nano-vllm's known bug class: the second request hits blocks the first is only now
    computing. The per-layer K/V write precedes every attention read of the step, so the
    hit is correct, and both answers equal the requests run alone."""
    loaded = ours(NAME)
    prompt = list(range(5, 23))  # 18 tokens: four full blocks of 4, and 2 more
    tails = {"a": [40], "b": [41], "c": []}
    greedy = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    engine = make_engine(loaded, block_size=4, prefix_caching=True)
    plans, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    finished = drive(engine, [(0, r, prompt + tail, greedy) for r, tail in tails.items()])
    assert [len(s.token_ids) for s in plans[0].scheduled] == [19, 3, 2], "b and c start after the 4 shared blocks"
    assert engine.kv_cache_manager.stats.hit_blocks == 8
    for request_id, tail in tails.items():
        assert finished[request_id] == alone(loaded, prompt + tail, greedy)


def test_parallel_samples_share_the_prompt_blocks_and_copy_on_write(ours):
    loaded = ours(NAME)
    engine = make_engine(loaded, block_size=4)
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=5, min_tokens=5)
    engine.add_request("p", Prompt(None, list(range(1, 11))), params)  # 10 tokens: 2 full blocks + 2 tokens
    total = engine.kv_cache_manager.pool.num_blocks
    engine.step()  # the prompt, once; then the fork
    tables = [engine.kv_cache_manager.block_table(f"{k}_p") for k in range(3)]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 3
    assert total - engine.kv_cache_manager.num_free_blocks == 3, "three sequences, one copy of the prompt"
    engine.step()  # each child writes its second token into the shared, partly filled block
    assert total - engine.kv_cache_manager.num_free_blocks == 3 + 2, "two copies; the last holder writes in place"
    finished = drive_outputs(engine, [])
    out = finished["p"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for k, completion in enumerate(out.outputs):
        alone_params = SamplingParams(temperature=0.8, seed=7 + k, max_tokens=5, min_tokens=5)
        assert completion.token_ids == alone(loaded, list(range(1, 11)), alone_params), f"sample {k}"
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "seeded samples differ"
    assert engine.kv_cache_manager.num_free_blocks == total


def test_greedy_parallel_samples_are_equal_and_finish_together(llm_for):
    llm = llm_for(NAME)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs) == 2 and out.outputs[0].token_ids == out.outputs[1].token_ids and out.finished


def test_n_beyond_max_num_seqs_is_a_clear_error(ours):
    engine = make_engine(ours(NAME), max_num_seqs=2)
    with pytest.raises(ValueError, match=r"n \(3\) must be at most max_num_seqs \(2\)"):
        engine.add_request("x", Prompt(None, [1, 2]), SamplingParams(n=3))
