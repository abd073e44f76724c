"""Lesson 06 through the engine: ``LLM`` generates what transformers generates (the tiny zoo
and the bundled SmolLM2), and a request's output does not depend on what else is in the
batch, on the chunk size, or on being preempted. Prefix caching (lesson 08) stays off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.engine.inputs import Prompt
from nanoengine.model import resolve_model_path
from nanoengine.sampling_params import SamplingParams
from tests.conftest import ZOO_NAMES
from tests.engines import alone, drive, make_engine
from tests.oracles import SMOLLM2_PROMPTS, assert_same_greedy, hf_greedy

# The whole engine runs both tasks of the lesson (the scheduler's first), so these count for
# the lesson; test_l06_scheduler.py and test_l06_model_runner.py test each task alone.
pytestmark = pytest.mark.l06

NAME = "llama-gqa"


@pytest.mark.parametrize("name", ZOO_NAMES)
@given(prompt=st.lists(st.integers(0, 319), min_size=1, max_size=48), num_tokens=st.integers(1, 24))
def test_greedy_generate_equals_transformers(name, prompt, num_tokens, llm_for, hf):
    llm = llm_for(name, prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens)
    ours = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert_same_greedy(hf(name), prompt, ours, hf_greedy(hf(name), prompt, num_tokens))


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_on_the_same_gguf():
    """The bundled GGUF, batched through the engine in float32, and transformers' greedy
    generation from the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = resolve_model_path(None)
    llm = LLM(dtype="float32", fast_path=False, enable_prefix_caching=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
    outputs = llm.generate(SMOLLM2_PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(SMOLLM2_PROMPTS, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        assert_same_greedy(hf_model, ids, out.outputs[0].token_ids, hf_greedy(hf_model, ids, 32))
    assert "Paris" in outputs[0].outputs[0].text


requests = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.lists(st.integers(1, 319), min_size=1, max_size=40),
        st.integers(1, 20),  # max_tokens
        st.sampled_from([None, 11]),  # greedy, or seeded sampling
    ),
    min_size=1, max_size=5,
)


def _arrivals(drawn):
    return [
        (step, f"r{i}", prompt, SamplingParams(temperature=0.0 if seed is None else 0.9, seed=seed,
                                               max_tokens=n, min_tokens=n))
        for i, (step, prompt, n, seed) in enumerate(drawn)
    ]


@given(drawn=requests, budget=st.sampled_from([None, 8, 13]))
def test_batched_and_chunked_equalalone(drawn, budget, ours):
    loaded = ours(NAME)
    arrivals = _arrivals(drawn)
    finished = drive(make_engine(loaded, budget=budget), arrivals)
    for _, request_id, prompt, params in arrivals:
        assert finished[request_id] == alone(loaded, prompt, params), f"{request_id} differs when batched"


@given(drawn=st.lists(st.tuples(st.just(0), st.lists(st.integers(1, 319), min_size=50, max_size=70),
                                st.integers(30, 50), st.sampled_from([None, 11])), min_size=4, max_size=6))
def test_preemption_changes_nothing(drawn, ours):
    loaded = ours(NAME)
    arrivals = _arrivals(drawn)
    # 256 slots; four requests grow to at least 4 x 80 = 320 tokens, so someone must be preempted
    engine = make_engine(loaded, num_tokens=256, block_size=4)
    finished = drive(engine, arrivals)
    assert engine.scheduler.num_preemptions > 0, "the test must force preemption"
    for _, request_id, prompt, params in arrivals:
        assert finished[request_id] == alone(loaded, prompt, params)
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks


def test_abort_frees_blocks_at_once(ours):
    engine = make_engine(ours(NAME))
    for i in range(3):
        engine.add_request(str(i), Prompt(None, [5] * 20), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("1")
    assert "1" not in engine.kv_cache_manager.tables
    while engine.has_unfinished_requests():
        assert all(o.request_id != "1" for o in engine.step())
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks


def test_a_cache_smaller_than_one_sequence_is_refused(ours):
    with pytest.raises(ValueError, match="less than max_model_len"):
        make_engine(ours(NAME), num_tokens=100)


def test_llm_reports_metrics_and_keeps_prompt_order(llm_for):
    llm = llm_for(NAME, prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": [4] * n} for n in (30, 3, 12)],
                        SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [len(o.prompt_token_ids) for o in outs] == [30, 3, 12]
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
