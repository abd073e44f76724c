"""Lesson 13: the engine in its own process, behind asyncio: many requests at once, early
exits abort, refused requests raise, and a dead engine process is reported, never hung on.

Task L13.T1 (the stream loop of ``AsyncEngine.generate``) is tested against a scripted engine
process, so that only the loop runs; the real engine process then runs the lesson whole."""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
import os
import signal
import subprocess
import threading
import time

import pytest
from transformers import AutoTokenizer

from nanoengine.engine.async_engine import AsyncEngine, EngineInfo, EngineMetrics
from nanoengine.engine.inputs import Prompt
from nanoengine.outputs import CompletionOutput, RequestOutput
from nanoengine.sampling_params import RequestOutputKind, SamplingParams
from tests.engines import alone, run_async
from tests.parallel_ranks import GREEDY, KV_BYTES, PROMPTS, greedy_tokens, parallel_llm

pytestmark = pytest.mark.l13

NAME = "llama-gqa"
TIMEOUT = 10  # seconds: a stream that never ends fails the test instead of hanging it


# --- L13.T1: the stream loop, against a scripted engine process ---------------------------

DIE = object()


class ScriptedEngineCore(threading.Thread):
    """The engine process's end of the pipe (``run_engine_core``'s messages), played by a
    thread from a script: each step, every live request gets its next scripted output (new
    tokens only, as the engine sends ``DELTA`` outputs). A request whose script is a string is refused
    with that message; a script that reaches ``DIE`` closes the pipe, as a crashed engine
    process would. ``aborted`` records the aborts that came in."""

    def __init__(self, conn, scripts) -> None:
        super().__init__(daemon=True)
        self.conn, self.scripts = conn, scripts
        self.live: dict = {}
        self.aborted: list[str] = []

    def run(self) -> None:
        try:
            while self._receive():
                outputs = []
                for request_id, steps in list(self.live.items()):
                    output = next(steps)
                    if output is DIE:
                        return
                    outputs.append(output)
                    if output.finished:
                        del self.live[request_id]
                self.conn.send(("outputs", outputs, EngineMetrics()))
                time.sleep(0.002)
        finally:
            self.conn.close()

    def _receive(self) -> bool:
        """Take the waiting messages (wait for one when idle); False on shutdown."""
        while not self.live or self.conn.poll():
            kind, *rest = self.conn.recv()
            if kind == "shutdown":
                return False
            request_id = rest[0]
            if kind == "abort":
                self.aborted.append(request_id)
                self.live.pop(request_id, None)
            elif isinstance(self.scripts[request_id], str):
                self.conn.send(("error", request_id, self.scripts[request_id]))
            else:
                self.live[request_id] = iter(self.scripts[request_id])
        return True


def _step(request_id, token_ids, finished=False):
    """One step's output of a one-sequence request: its new tokens."""
    completion = CompletionOutput(0, "", list(token_ids), finish_reason="length" if finished else None)
    return RequestOutput(request_id, None, [1, 2], None, [completion], finished)


def _endless(request_id, token_ids):
    """A request the engine would run for ever: ``token_ids``, then token 5 at every step."""
    yield from (_step(request_id, [t]) for t in token_ids)
    while True:
        yield _step(request_id, [5])


@pytest.fixture
def scripted(zoo_paths):
    """``scripted(scripts)``: an AsyncEngine over a ScriptedEngineCore; returns both. The thread
    stands in for the engine process too (AsyncEngine only joins it and asks if it is alive)."""
    tokenizer = AutoTokenizer.from_pretrained(zoo_paths[NAME])
    started = []

    def start(scripts):
        ours, theirs = multiprocessing.Pipe()
        core = ScriptedEngineCore(theirs, scripts)
        core.start()
        started.append(AsyncEngine([(core, ours)], EngineInfo("scripted", tokenizer, 256, 320, 64, 4)))
        return started[-1], core

    yield start
    for engine in started:
        engine.shutdown()


def _stream(engine, request_id, params, quit_after=None):
    """Run one request's stream to its end (or ``quit_after`` snapshots); a copy of each
    snapshot it yielded."""
    async def run():
        seen = []
        async for out in engine.generate(Prompt(None, [1, 2]), params, request_id):
            seen.append(copy.deepcopy(out))
            if len(seen) == quit_after:
                break
        return seen

    return run_async(asyncio.wait_for(run(), TIMEOUT))


async def _last(engine, request_id, params, prompt=(1, 2)):
    """The last snapshot a request's stream yields."""
    last = None
    async for out in engine.generate(Prompt(None, list(prompt)), params, request_id):
        last = out
    return last


def _eventually(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.l13_t1
def test_a_stream_yields_the_request_so_far_until_the_engine_finishes_it(scripted, zoo_paths):
    tokenizer = AutoTokenizer.from_pretrained(zoo_paths[NAME])
    tokens = tokenizer("The quick brown fox")["input_ids"]
    steps = [_step("r", tokens[:1]), _step("r", tokens[1:5]), _step("r", tokens[5:], finished=True)]
    engine, _ = scripted({"r": steps})
    seen = _stream(engine, "r", SamplingParams(max_tokens=len(tokens)))
    assert [s.outputs[0].token_ids for s in seen] == [tokens[:1], tokens[:5], tokens]
    assert [s.outputs[0].text for s in seen] == ["The", "The quick", "The quick brown fox"]
    assert [s.finished for s in seen] == [False, False, True] and seen[-1].outputs[0].finish_reason == "length"
    assert engine.num_unfinished == 0


@pytest.mark.l13_t1
def test_a_consumer_that_stops_early_aborts_its_request(scripted):
    engine, core = scripted({"quitter": _endless("quitter", [])})
    assert len(_stream(engine, "quitter", SamplingParams(max_tokens=200), quit_after=3)) == 3
    assert _eventually(lambda: core.aborted == ["quitter"]), "the engine was not told to abort"
    assert engine.num_unfinished == 0


@pytest.mark.l13_t1
def test_abort_ends_the_stream_without_a_finished_output(scripted):
    engine, core = scripted({"ab": _endless("ab", [])})

    async def run():
        seen = []
        async for out in engine.generate(Prompt(None, [1, 2]), SamplingParams(max_tokens=500), "ab"):
            seen.append(out.finished)
            if len(seen) == 2:
                await engine.abort("ab")
        return seen

    seen = run_async(asyncio.wait_for(run(), TIMEOUT))
    assert len(seen) >= 2 and not any(seen)
    assert _eventually(lambda: "ab" in core.aborted) and engine.num_unfinished == 0


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY])
def test_an_output_kind_the_stream_does_not_offer_is_refused(scripted, kind):
    """``generate`` yields the request so far at every step; asked for another kind, it says so
    before anything reaches the engine."""
    engine, core = scripted({})
    with pytest.raises(ValueError, match=f"output_kind {kind.name} is not offered"):
        _stream(engine, "k", SamplingParams(max_tokens=2, output_kind=kind))
    assert engine.num_unfinished == 0 and core.aborted == []


@pytest.mark.l13_t1
def test_a_refused_request_raises_and_the_others_go_on(scripted):
    good = [_step("good", [40]), _step("good", [41], finished=True)]
    engine, core = scripted({"bad": "logit_bias has token ids outside the vocabulary", "good": good})
    params = SamplingParams(max_tokens=4)

    async def run():
        first = asyncio.create_task(_last(engine, "good", params))
        with pytest.raises(ValueError, match="logit_bias"):
            await _last(engine, "bad", params)
        return await first

    assert run_async(asyncio.wait_for(run(), TIMEOUT)).outputs[0].token_ids == [40, 41]
    assert engine.num_unfinished == 0 and core.aborted == [], "nothing was left for the engine to abort"


@pytest.mark.l13_t1
def test_a_stop_string_ends_the_stream_and_aborts_the_engines_request(scripted, zoo_paths):
    """The engine sends tokens only; the text and its stop strings are made in front of it,
    so a stop string ends a sequence the engine would run on: its blocks must be freed."""
    tokens = AutoTokenizer.from_pretrained(zoo_paths[NAME])("The quick brown fox")["input_ids"]
    engine, core = scripted({"s": _endless("s", tokens)})
    seen = _stream(engine, "s", SamplingParams(max_tokens=100, stop=["brown"]))
    final = seen[-1].outputs[0]
    assert seen[-1].finished and not any(s.finished for s in seen[:-1])
    assert (final.text, final.finish_reason, final.stop_reason) == ("The quick ", "stop", "brown")
    assert _eventually(lambda: core.aborted == ["s"]), "the engine was not told to abort"
    assert engine.num_unfinished == 0


@pytest.mark.l13_t1
def test_a_dead_engine_process_ends_the_stream_with_an_error(scripted):
    engine, _ = scripted({"r": [_step("r", [40]), DIE]})
    with pytest.raises(RuntimeError, match="engine process stopped"):
        _stream(engine, "r", SamplingParams(max_tokens=4))
    assert engine.num_unfinished == 0


# --- the real engine process ----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(zoo_paths):
    started = AsyncEngine.start(str(zoo_paths[NAME]), dtype="float32", kv_cache_memory_bytes=2**22, block_size=4,
                                fast_path=False)
    yield started
    started.shutdown()


def test_concurrent_requests_equal_their_runs_alone(engine, ours):
    greedy = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    prompts = [[1, 2, 3 + i] for i in range(8)]

    async def run():
        return await asyncio.gather(*(_last(engine, f"c{i}", greedy, p) for i, p in enumerate(prompts)))

    outputs = run_async(asyncio.wait_for(run(), 60))
    assert all(out.finished for out in outputs)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == alone(ours(NAME), prompt, greedy)
    assert engine.info.model_name == NAME and engine.info.vocab_size == 320


def test_an_early_exit_frees_the_requests_blocks_in_the_engine(engine):
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

    metrics = run_async(asyncio.wait_for(run(), 60))
    assert (metrics.num_running, metrics.num_waiting, metrics.num_used_blocks) == (0, 0, 0)
    assert engine.num_unfinished == 0


def test_the_engines_refusal_reaches_the_caller(engine):
    with pytest.raises(ValueError, match="logit_bias"):
        run_async(asyncio.wait_for(_last(engine, "bad", SamplingParams(logit_bias={5000: 1.0})), 60))


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not start"):
        AsyncEngine.start(str(tmp_path / "nothing-here"))


def test_the_terminal_chat_streams_a_reply_and_exits(zoo_paths):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "nanoengine", "chat", str(zoo_paths[NAME]), "--dtype", "float32", "--max-tokens", "5",
         "--no-fast-path"],
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


@pytest.mark.parametrize("stop", [[], ["e"], ["ab", "xyz"]])
def test_delta_outputs_merge_back_into_the_cumulative_ones(llm_for, stop):
    """The same seeded request run CUMULATIVE and DELTA: each delta carries one new token a
    sequence (the prompt only first), and the merged deltas, their texts joined, equal the
    last cumulative output, stop strings (held back until they cannot match) included."""
    from nanoengine.engine.async_engine import merge_output

    engine = llm_for(NAME).llm_engine
    runs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        params = SamplingParams(n=2, temperature=0.8, seed=4, max_tokens=6, min_tokens=2, logprobs=3,
                                prompt_logprobs=1, stop=stop, output_kind=kind)
        engine.add_request(kind.name, Prompt(None, [3, 4, 5, 6]), params)
        runs[kind] = []
        while engine.has_unfinished_requests():
            runs[kind] += [copy.deepcopy(out) for out in engine.step()]
    final = runs[RequestOutputKind.CUMULATIVE][-1]
    snapshot, texts = None, {}
    for i, delta in enumerate(runs[RequestOutputKind.DELTA]):
        if i:
            assert delta.prompt_token_ids == [] and delta.prompt_logprobs is None
            assert all(len(c.token_ids) <= 1 for c in delta.outputs)
        for c in delta.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text
        snapshot = delta if snapshot is None else merge_output(snapshot, delta)
    assert snapshot.finished and final.finished
    assert snapshot.prompt_token_ids == final.prompt_token_ids and snapshot.prompt_logprobs == final.prompt_logprobs
    assert [(c.index, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason) for c in snapshot.outputs] \
        == [(c.index, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason) for c in final.outputs]
    assert texts == {c.index: c.text for c in final.outputs}


def test_delta_text_holds_back_what_may_start_a_stop_string(llm_for):
    """Two tokens whose texts meet in a two-character stop string: the delta after the first
    keeps back its last character (it might begin the stop string), and the sequence ends
    with the text before the stop string, nothing of it ever sent."""
    from nanoengine.engine.output_processor import OutputProcessor
    from nanoengine.request import append_token, stop_on_string
    from nanoengine.request import Request

    tokenizer = llm_for(NAME).loaded.tokenizer
    first, second = [t for t in range(3, 400) if len(tokenizer.decode([t])) >= 2
                     and tokenizer.decode([t]).isalpha()][:2]  # two tokens of plain letters
    first_text, second_text = tokenizer.decode([first]), tokenizer.decode([first, second])[len(tokenizer.decode([first])):]
    stop = first_text[-1] + second_text[0]
    params = SamplingParams(max_tokens=4, stop=[stop], output_kind=RequestOutputKind.DELTA)
    request = Request("s", None, [5, 6], params, frozenset(), 0.0)
    processor = OutputProcessor(request, tokenizer, max_model_len=64)

    def deliver(token: int) -> None:  # as the engine does: the owner appends, the processor reads
        ended = append_token(request, token, 64)
        stop = processor.observe(token, None, ended)
        if stop is not None:
            stop_on_string(request, stop)

    deliver(first)
    assert processor.delta().text == first_text[:-1]
    deliver(second)
    assert request.status.finished and request.stop_reason == stop
    assert processor.delta().text == "" and processor.text == first_text[:-1]


def test_final_only_gives_one_output_and_generate_refuses_delta(llm_for):
    llm = llm_for(NAME)
    engine = llm.llm_engine
    engine.add_request("f", Prompt(None, [3, 4, 5]), SamplingParams(max_tokens=5, ignore_eos=True,
                                                                output_kind=RequestOutputKind.FINAL_ONLY))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="output_kind DELTA"):
        llm.generate("hi", SamplingParams(output_kind=RequestOutputKind.DELTA))
    with pytest.raises(ValueError, match="output_kind must be one of"):
        SamplingParams(output_kind=True)


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
        ours = run_async(asyncio.wait_for(_last(engine, f"text-{include_stop}-{i}", params, prompt), 60))
        assert ours.finished
        _same_logprobs(ours.prompt_logprobs, offline.prompt_logprobs)
        for a, b in zip(ours.outputs, offline.outputs, strict=True):
            assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
                (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason)
            _same_logprobs(a.logprobs, b.logprobs)
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert engine.num_unfinished == 0


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


# --- lesson 12's parallel engines behind the server ------------------------------------

def test_two_data_parallel_replicas_share_concurrent_requests(zoo_paths):
    want = greedy_tokens(parallel_llm(zoo_paths["llama-gqa"]))
    engine = AsyncEngine.start(str(zoo_paths["llama-gqa"]), data_parallel_size=2, dtype="float32", fast_path=False,
                               kv_cache_memory_bytes=KV_BYTES)

    async def one(i: int, prompt: list[int]) -> list[int]:
        final = None
        async for output in engine.generate(Prompt(None, prompt), GREEDY, f"r{i}"):
            final = output
        return list(final.outputs[0].token_ids)

    async def all_at_once():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS * 2)))

    try:
        got = run_async(all_at_once())
        assert got == want * 2
        assert all(replica.num_requests >= 2 for replica in engine._replicas)
        assert engine.metrics().num_blocks == engine.info.num_blocks
    finally:
        engine.shutdown()


def test_a_served_engine_with_two_ranks_answers_then_fails_clearly_when_a_rank_dies(zoo_paths):
    path = zoo_paths["llama-gqa"]
    want = greedy_tokens(parallel_llm(path))[0]
    engine = AsyncEngine.start(str(path), dtype="float32", fast_path=False, kv_cache_memory_bytes=KV_BYTES,
                               tensor_parallel_size=2)

    async def tokens(request_id: str, params: SamplingParams) -> list[int]:
        final = None
        async for output in engine.generate(Prompt(None, PROMPTS[0]), params, request_id):
            final = output
        return list(final.outputs[0].token_ids)

    try:
        assert run_async(tokens("first", GREEDY)) == want
        core = engine._replicas[0].process.pid
        workers = subprocess.run(["pgrep", "-P", str(core)], capture_output=True, text=True).stdout.split()
        for pid in workers:  # the rank-1 worker (and the core's resource tracker, which does not matter)
            os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"parallel worker failed \(rank 1"):
            run_async(tokens("second", SamplingParams(max_tokens=200, ignore_eos=True)))
        assert not engine.is_healthy()
    finally:
        engine.shutdown()
