"""Lesson 16's picture: the blocks a growing request holds, with every layer sliding and with full
attention. The figure reads its traces faithfully (its lines are the counts, its cells the
tables), the example's counts are what the real engine gives a real model, the bound it draws
holds for any request, and it builds headless and deterministically."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from nanoengine.cache.kv_cache_manager import KVCacheManager  # noqa: E402
from nanoengine.request import Request  # noqa: E402
from nanoengine.sampling_params import SamplingParams  # noqa: E402
from nanoengine.scheduler import Scheduler  # noqa: E402
from nanoengine.scheduler.simulate import simulate_step  # noqa: E402
from nanoengine.trace import Trace  # noqa: E402
from nanoengine.viz import (  # noqa: E402
    blocks_held,
    example_sliding_traces,
    last_table,
    save_figure,
    sliding_window_blocks,
    sliding_window_bound,
)
from nanoengine.viz.examples import (  # noqa: E402
    SLIDING_BLOCK_SIZE,
    SLIDING_OUTPUT_LEN,
    SLIDING_PROMPT_LEN,
    SLIDING_TOKEN_BUDGET,
    SLIDING_WINDOW,
)

pytestmark = pytest.mark.l16


@pytest.fixture(scope="module")
def example():
    return example_sliding_traces()


def _run(prompt_len: int, output_len: int, block_size: int, budget: int, window: int | None) -> Trace:
    """One request through the real scheduler and manager, with the stand-in model."""
    trace = Trace(256, block_size)
    scheduler = Scheduler(KVCacheManager(256, block_size, trace, sliding_window=window), budget, 1, trace=trace)
    scheduler.add_request(Request("r", None, list(range(3, 3 + prompt_len)),
                                  SamplingParams(max_tokens=output_len, ignore_eos=True), frozenset(), 0.0))
    while scheduler.has_unfinished_requests():
        simulate_step(scheduler)
        assert trace.step < 1000
    return trace


def test_the_example_holds_every_block_without_the_window_and_a_few_with_it(example):
    runs, request_id = example
    (full, no_window), (sliding, window) = runs.values()
    assert (no_window, window) == (None, SLIDING_WINDOW)
    total = SLIDING_PROMPT_LEN + SLIDING_OUTPUT_LEN
    full_held, sliding_held = blocks_held(full, request_id), blocks_held(sliding, request_id)
    assert len(full_held) == len(sliding_held), "the window must not change the schedule"
    # the last step computes the last token but one (the last is sampled, never computed)
    assert max(full_held) == math.ceil((total - 1) / SLIDING_BLOCK_SIZE) and full_held[-1] == sliding_held[-1] == 0
    prefill_steps = math.ceil(SLIDING_PROMPT_LEN / SLIDING_TOKEN_BUDGET)
    decoding = sliding_held[prefill_steps:-1]
    assert max(decoding) == sliding_window_bound(SLIDING_WINDOW, SLIDING_BLOCK_SIZE) == 3
    table, num_tokens = last_table(sliding, request_id)
    assert num_tokens == total - 1 and len(table) == math.ceil(num_tokens / SLIDING_BLOCK_SIZE)
    first_key = num_tokens - SLIDING_WINDOW  # the first key the last computed token saw
    assert all((block is None) == ((i + 1) * SLIDING_BLOCK_SIZE <= first_key) for i, block in enumerate(table))


def test_the_figure_draws_the_counts_and_the_tables(example):
    runs, request_id = example
    fig = sliding_window_blocks(runs, request_id)
    lines = {line.get_gid(): line for line in fig.axes[0].lines if line.get_gid()}
    cells = {c.get_gid(): c for c in fig.axes[1].collections if c.get_gid()}
    for label, (trace, window) in runs.items():
        assert list(lines[label].get_ydata()) == blocks_held(trace, request_id)
        table, _ = last_table(trace, request_id)
        assert len(cells[f"{label}:held"].get_paths()) == sum(block is not None for block in table)
        assert len(cells[f"{label}:given back"].get_paths()) == table.count(None)
        if window is None:
            assert f"{label}:bound" not in lines
        else:
            assert set(lines[f"{label}:bound"].get_ydata()) == {sliding_window_bound(window, trace.block_size)}


@settings(max_examples=50, deadline=None)
@given(prompt_len=st.integers(1, 40), output_len=st.integers(1, 40), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 24), window=st.integers(1, 20))
def test_a_sliding_request_never_holds_more_than_its_chunk_and_window_need(prompt_len, output_len, block_size,
                                                                          budget, window):
    """The figure's dashed bound holds for any request once it decodes, and a prefill chunk of
    ``c`` tokens adds what its own keys need; with full attention, every block is held."""
    sliding = blocks_held(_run(prompt_len, output_len, block_size, budget, window), "r")
    full = blocks_held(_run(prompt_len, output_len, block_size, budget, None), "r")
    assert len(sliding) == len(full)
    chunk = min(budget, prompt_len)
    assert max(sliding) <= math.ceil((chunk + window - 1) / block_size) + 1
    decode_steps = sliding[math.ceil(prompt_len / budget):-1]
    assert max(decode_steps, default=0) <= sliding_window_bound(window, block_size)
    assert max(full) == math.ceil((prompt_len + output_len - 1) / block_size)


def test_the_example_counts_are_what_the_real_engine_gives_a_real_model(example, tmp_path):
    """Build the zoo's tiny Gemma 3 twice, every layer sliding over 8 tokens and with its global
    layer kept, and run the example's request through ``LLM``: the counts are the example's."""
    from nanoengine import LLM
    from tests.zoo import build_model, build_tokenizer

    runs, request_id = example
    tokenizer = build_tokenizer()
    model = build_model("gemma3", len(tokenizer))
    assert model.config.sliding_window == SLIDING_WINDOW
    params = SamplingParams(temperature=0.0, max_tokens=SLIDING_OUTPUT_LEN, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(40, 40 + SLIDING_PROMPT_LEN))}
    for (label, (trace, window)), layer_type in zip(runs.items(), ("full_attention", "sliding_attention")):
        path = tmp_path / layer_type
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config["layer_types"][-1] = layer_type  # a global last layer: every block stays
        (path / "config.json").write_text(json.dumps(config))
        llm = LLM(str(path), dtype="float32", fast_path=False, block_size=SLIDING_BLOCK_SIZE,
                  max_num_batched_tokens=SLIDING_TOKEN_BUDGET, max_num_seqs=1, enable_prefix_caching=False,
                  trace=True)
        assert llm.llm_engine.kv_cache_manager.sliding_window == window
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == SLIDING_OUTPUT_LEN
        assert blocks_held(llm.llm_engine.trace, out.request_id) == blocks_held(trace, request_id), label


def test_sliding_window_blocks_builds_headless_and_is_deterministic(example, tmp_path):
    fig = sliding_window_blocks(*example)
    assert isinstance(fig, Figure)
    first = save_figure(fig, tmp_path / "a.png").read_bytes()
    assert first == save_figure(sliding_window_blocks(*example_sliding_traces()), tmp_path / "b.png").read_bytes()
    assert isinstance(sliding_window_blocks({"empty": (Trace(4, 2), 4)}, "nobody"), Figure)
