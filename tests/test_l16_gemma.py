"""Lesson 16, Gemma 3: sliding-window attention over the paged cache, and the bundled
Gemma 3 270M against transformers loading the same GGUF.

The zoo's tiny Gemma 3 against transformers (logits, engine tokens) is in test_l16_models.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.attention.sliding_window import sliding_window_attention
from nanoengine.engine.naive import NaiveEngine
from nanoengine.model import resolve_model_path
from nanoengine.model.loader import load_hf_config
from nanoengine.sampling_params import SamplingParams
from tests.oracles import assert_same_greedy, hf_greedy
from tests.paged import paged_batches

pytestmark = pytest.mark.l16


@pytest.mark.l16_t3
@given(batch=paged_batches(), window=st.integers(1, 12))
def test_a_windowed_query_sees_its_last_keys_and_reads_no_block_before_them(batch, window):
    """Blocks wholly before a sequence's window hold NaN (as if freed and reused): the
    result must still equal dense windowed attention."""
    k_cache, v_cache = batch.pool()
    for table, (cached, _) in zip(batch.tables, batch.seqs):
        for block in table[: max(0, cached - window + 1) // batch.block_size]:
            k_cache[block], v_cache[block] = float("nan"), float("nan")
    out = sliding_window_attention(batch.q, k_cache, v_cache, batch.metadata(), batch.scale, window)
    torch.testing.assert_close(out.double(), batch.expected(window), rtol=1e-5, atol=1e-5)


def test_the_contiguous_cache_of_lesson_02_refuses_a_windowed_model(ours):
    with pytest.raises(ValueError, match="contiguous KV cache has no sliding window"):
        NaiveEngine(ours("gemma3"), kv_cache="contiguous")
    assert NaiveEngine(ours("gemma3"), kv_cache="paged")


def test_a_windowed_model_runs_past_its_window(zoo_paths, ours):
    """The window does not cap the model's length, as it does for models that ignore it."""
    assert ours("gemma3").max_model_len == 256 > ours("gemma3").hf_config.sliding_window


GEMMA_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers_on_the_same_gguf():
    """The bundled GGUF, batched through the engine in float32, and transformers' greedy
    generation from the same file: 32 tokens of 4 prompts."""
    from transformers import AutoModelForCausalLM

    gguf_path = resolve_model_path("gemma3-270m")
    llm = LLM("gemma3-270m", dtype="float32", fast_path=False, enable_prefix_caching=False)
    tokenizer = llm.get_tokenizer()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
    outputs = llm.generate(GEMMA_PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(GEMMA_PROMPTS, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert out.prompt_token_ids == ids and ids[0] == tokenizer.bos_token_id
        assert_same_greedy(hf_model, ids, out.outputs[0].token_ids, hf_greedy(hf_model, ids, 32))
    assert "France" in outputs[0].outputs[0].text  # the base model, not instruction-tuned, but on topic


def test_gemma3_270m_config_comes_from_the_gguf():
    config = load_hf_config("gemma3-270m")
    assert (config.model_type, config.num_hidden_layers, config.sliding_window) == ("gemma3_text", 18, 512)
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


@pytest.mark.l16_t5
@given(num_blocks=st.integers(0, 12), block_size=st.sampled_from([1, 2, 4, 16]), window=st.integers(1, 40),
       steps=st.lists(st.integers(0, 8), min_size=1, max_size=6))
def test_sliding_gives_back_exactly_the_blocks_before_the_window(num_blocks, block_size, window, steps):
    """Across several steps (each a first new token further on): an entry is out of the
    window exactly when its block ends before that token's window starts; each block is
    given back once, and the entries in the window keep their blocks."""
    from nanoengine.cache.kv_cache_manager import OUT_OF_WINDOW, slide_window

    table, original, released = list(range(100, 100 + num_blocks)), list(range(100, 100 + num_blocks)), []
    first_query = 0
    for advance in steps:
        first_query = min(first_query + advance, num_blocks * block_size)
        released += slide_window(table, first_query, window, block_size)
        first_key = max(0, first_query - window + 1)
        for index, entry in enumerate(table):
            before = (index + 1) * block_size <= first_key
            assert entry == (OUT_OF_WINDOW if before else original[index])
    assert released == [b for b, entry in zip(original, table) if entry == OUT_OF_WINDOW]


def test_an_all_sliding_model_holds_no_more_blocks_than_its_window_needs(zoo_paths, tmp_path):
    """Every layer local (window 8, blocks of 4): once a request is past its prompt it holds at
    most 3 blocks however long it grows, the blocks it gives back serve the other request,
    and the tokens still equal transformers'."""
    import json
    import math
    import shutil

    from transformers import AutoModelForCausalLM

    from nanoengine.cache.kv_cache_manager import OUT_OF_WINDOW
    from nanoengine.engine.inputs import Prompt

    path = tmp_path / "gemma3-local"
    shutil.copytree(zoo_paths["gemma3"], path)
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] * len(config["layer_types"])
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(path), dtype="float32", fast_path=False, block_size=4, enable_prefix_caching=False)
    engine, manager = llm.llm_engine, llm.llm_engine.kv_cache_manager
    prompts = {"a": list(range(40, 60)), "b": [5, 17, 33, 2, 90]}
    params = SamplingParams(temperature=0.0, max_tokens=60, min_tokens=60)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, Prompt(None, prompt), params)
    most_held = {request_id: 0 for request_id in prompts}
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        for request_id, table in manager.tables.items():
            if manager.num_tokens[request_id] > len(prompts[request_id]) + 4:
                most_held[request_id] = max(most_held[request_id], sum(b != OUT_OF_WINDOW for b in table))
    assert max(most_held.values()) <= math.ceil(8 / 4) + 1
    assert manager.num_free_blocks == manager.pool.num_blocks
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for request_id, prompt in prompts.items():
        assert_same_greedy(hf_model, prompt, outputs[request_id], hf_greedy(hf_model, prompt, 60))
