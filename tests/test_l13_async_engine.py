"""Lesson 13: the engine in its own process, behind asyncio: many requests at once, early
exits abort, refused requests raise, and a dead engine process is reported, never hung on."""

from __future__ import annotations

import asyncio

import pytest

from nanoengine.engine.async_engine import AsyncEngine
from nanoengine.engine.inputs import Prompt
from nanoengine.sampling_params import SamplingParams
from tests.engines import alone, run_async

pytestmark = pytest.mark.l13

NAME = "llama-gqa"


@pytest.fixture(scope="module")
def engine(zoo_paths):
    started = AsyncEngine.start(str(zoo_paths[NAME]), dtype="float32", kv_cache_memory_bytes=2**22, block_size=4,
                                fast_path=False)
    yield started
    started.shutdown()


async def _last(engine, prompt, params, request_id):
    last = None
    async for out in engine.generate(Prompt(None, prompt), params, request_id):
        last = out
    return last


@pytest.mark.l13_t1
def test_concurrent_requests_equal_their_runs_alone(engine, ours):
    greedy = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    prompts = [[1, 2, 3 + i] for i in range(8)]

    async def run():
        return await asyncio.gather(*(_last(engine, p, greedy, f"c{i}") for i, p in enumerate(prompts)))

    outputs = run_async(run())
    assert all(out.finished for out in outputs)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == alone(ours(NAME), prompt, greedy)
    assert engine.info.model_name == NAME and engine.info.vocab_size == 320


@pytest.mark.l13_t1
def test_a_consumer_that_stops_early_aborts_and_frees_its_blocks(engine):
    async def run():
        stream = engine.generate(Prompt(None, [4, 5, 6]), SamplingParams(max_tokens=200, ignore_eos=True), "quitter")
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        for _ in range(50):
            await asyncio.sleep(0.02)
            metrics = engine.metrics()
            if metrics.num_running == 0 and metrics.num_used_blocks == 0:
                return metrics
        return engine.metrics()

    metrics = run_async(run())
    assert (metrics.num_running, metrics.num_waiting, metrics.num_used_blocks) == (0, 0, 0)
    assert engine.num_unfinished == 0


@pytest.mark.l13_t1
def test_abort_ends_the_stream(engine):
    async def run():
        outputs = []

        async def consume():
            async for out in engine.generate(Prompt(None, [7, 8]), SamplingParams(max_tokens=500, ignore_eos=True), "ab"):
                outputs.append(out)

        task = asyncio.create_task(consume())
        while not outputs:
            await asyncio.sleep(0.01)
        await engine.abort("ab")
        await asyncio.wait_for(task, timeout=5)
        return outputs

    outputs = run_async(run())
    assert outputs and not outputs[-1].finished


@pytest.mark.l13_t1
def test_a_refused_request_raises_and_others_go_on(engine):
    async def run():
        good = asyncio.create_task(_last(engine, [1, 2], SamplingParams(temperature=0, max_tokens=4), "good"))
        with pytest.raises(ValueError, match="logit_bias"):
            await _last(engine, [1, 2], SamplingParams(logit_bias={5000: 1.0}), "bad")
        return await good

    assert run_async(run()).finished


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not start"):
        AsyncEngine.start(str(tmp_path / "nothing-here"))


def test_the_terminal_chat_streams_a_reply_and_exits(zoo_paths):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "nanoengine", "chat", str(zoo_paths[NAME]), "--dtype", "float32", "--max-tokens", "5"],
        input="hello\n/reset\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "chatting with llama-gqa" in done.stdout and done.stdout.count("you> ") == 3
    assert "model> " in done.stdout


def test_request_lives_figure_reads_what_the_client_saw():
    from nanoengine.viz import RequestLife, request_lives
    from nanoengine.viz.style import figure_png

    lives = [RequestLife("a", 0.0, (0.5, 0.6, 0.7)), RequestLife("b", 0.1, (1.1, 1.15, 2.0))]
    assert lives[0].ttft == 0.5 and lives[1].ttft == pytest.approx(1.0)
    assert lives[1].longest_gap == pytest.approx(0.85) and RequestLife("c", 0, (1.0,)).longest_gap == 0
    assert figure_png(request_lives(lives)) == figure_png(request_lives(lives))
    with pytest.raises(ValueError, match="at least one streamed chunk"):
        request_lives([RequestLife("d", 0.0, ())])


@pytest.mark.l13_t1
def test_outputs_cross_the_pipe_as_deltas_and_merge_back(llm_for):
    import copy

    from nanoengine.engine.async_engine import merge_output, only_new

    llm = llm_for(NAME)
    engine = llm.llm_engine
    params = SamplingParams(n=2, temperature=0.8, seed=4, max_tokens=6, min_tokens=6, logprobs=3, prompt_logprobs=1)
    engine.add_request("d", Prompt(None, [3, 4, 5, 6]), params)
    sent, snapshot, steps = {}, None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            steps.append(copy.deepcopy(out))
            delta = only_new(out, sent)
            if snapshot is not None:
                assert delta.prompt_token_ids == [] and all(len(c.token_ids) == 1 for c in delta.outputs)
            snapshot = delta if snapshot is None else merge_output(snapshot, delta)
    final = steps[-1]
    assert snapshot.finished and sent == {}
    assert snapshot.prompt_token_ids == final.prompt_token_ids and snapshot.prompt_logprobs == final.prompt_logprobs
    assert [(c.index, c.token_ids, c.logprobs, c.text, c.cumulative_logprob, c.finish_reason) for c in snapshot.outputs] \
        == [(c.index, c.token_ids, c.logprobs, c.text, c.cumulative_logprob, c.finish_reason) for c in final.outputs]


def _same_logprobs(ours, theirs):
    """Equal positions, tokens, ranks and texts; values within float32 noise (the two engines'
    KV blocks differ in size, so their attention sums round differently)."""
    if ours is None or theirs is None:
        assert ours is theirs
        return
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert [(t, x.rank, x.decoded_token) for t, x in a.items()] == [(t, x.rank, x.decoded_token) for t, x in b.items()]
            assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)


@pytest.mark.l13_t1
@pytest.mark.parametrize("include_stop", [False, True])
def test_text_made_in_front_of_the_engine_equals_offline_text(engine, llm_for, include_stop):
    """The engine process sends tokens only; the async engine makes the text and ends sequences
    on stop strings. Everything a user sees must equal the offline engine's answer."""
    llm = llm_for(NAME)
    prompt = [9, 8, 7, 6, 5]
    free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"no usable stop string in {text!r}"
    cases = [
        SamplingParams(temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=include_stop,
                       logprobs=2, prompt_logprobs=1),
        SamplingParams(n=2, temperature=0.9, seed=6, max_tokens=10, stop=[stop], logprobs=1),
    ]
    for i, params in enumerate(cases):
        offline = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        ours = run_async(_last(engine, prompt, params, f"text-{include_stop}-{i}"))
        assert ours.finished
        _same_logprobs(ours.prompt_logprobs, offline.prompt_logprobs)
        for a, b in zip(ours.outputs, offline.outputs, strict=True):
            assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
                (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason)
            _same_logprobs(a.logprobs, b.logprobs)
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert engine.num_unfinished == 0


@pytest.mark.l13_t1
def test_a_stop_string_inside_a_multi_token_delta_cuts_the_tokens_after_it(llm_for):
    """One step may bring several tokens (speculative decoding, lesson 10): the tokens after a
    stop string are dropped, with their logprobs."""
    from nanoengine.engine.async_engine import FrontendText
    from nanoengine.outputs import CompletionOutput, RequestOutput

    llm = llm_for(NAME)
    prompt = [9, 8, 7, 6, 5]
    free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, logprobs=1),
                        use_tqdm=False)[0].outputs[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop], logprobs=1)
    stopped = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    assert len(stopped.token_ids) < len(free.token_ids)
    delta = RequestOutput("r", None, prompt, None, [CompletionOutput(0, "", list(free.token_ids), free.cumulative_logprob,
                                                                     list(free.logprobs), "length")], True)
    (cut,) = FrontendText(llm.get_tokenizer(), prompt, params).apply(delta).outputs
    assert (cut.text, cut.token_ids, cut.finish_reason, cut.stop_reason) == \
        (stopped.text, stopped.token_ids, "stop", stop)
    assert len(cut.logprobs) == len(cut.token_ids)
    assert cut.cumulative_logprob == pytest.approx(stopped.cumulative_logprob, abs=1e-5)
