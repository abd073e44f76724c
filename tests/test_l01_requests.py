"""Lesson 01: a request's life through ``LLM``: prompts, stopping, finish reasons, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import SamplingParams
from nanoengine.request import TokenView

pytestmark = pytest.mark.l01

PROMPT = {"prompt_token_ids": [17, 42, 99, 3, 250, 7]}


@pytest.fixture(scope="module")
def llm(recompute_llm_for):
    return recompute_llm_for("llama-gqa")


def _greedy(llm, **kwargs):
    params = SamplingParams(temperature=0.0, **kwargs)
    return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]


def test_max_tokens_finishes_with_length(llm):
    out = _greedy(llm, max_tokens=7, ignore_eos=True)
    assert len(out.token_ids) == 7 and out.finish_reason == "length" and out.stop_reason is None


def test_stop_string_cuts_text_and_is_reported(llm):
    full = _greedy(llm, max_tokens=40, ignore_eos=True, skip_special_tokens=False)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3
    out = _greedy(llm, max_tokens=40, ignore_eos=True, stop=[stop], skip_special_tokens=False)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    kept = _greedy(llm, max_tokens=40, ignore_eos=True, stop=stop, include_stop_str_in_output=True,
                   skip_special_tokens=False)
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_id_is_kept_in_token_ids(llm):
    full = _greedy(llm, max_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = _greedy(llm, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_a_seed_makes_a_requests_sampling_reproducible(llm):
    def run(seed):
        params = SamplingParams(temperature=1.5, max_tokens=24, min_tokens=24, seed=seed)
        return llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_eos_ends_the_sequence_unless_ignored(llm):
    eos = next(iter(llm.loaded.eos_token_ids))
    bias_prompt = _find_prompt_that_reaches_eos(llm, eos)
    out = llm.generate(bias_prompt, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == eos and out.finish_reason == "stop" and out.stop_reason is None
    ignored = llm.generate(bias_prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 64 and ignored.finish_reason == "length"


def test_min_tokens_masks_eos(llm):
    eos = next(iter(llm.loaded.eos_token_ids))
    prompt = _find_prompt_that_reaches_eos(llm, eos)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, min_tokens=30), use_tqdm=False)[0]
    assert eos not in out.outputs[0].token_ids[:30]


def _find_prompt_that_reaches_eos(llm, eos):
    """A prompt whose greedy continuation emits EOS within 64 tokens (searched, deterministic)."""
    for start in range(3, 320, 7):
        prompt = {"prompt_token_ids": [start, (start * 7) % 320, (start * 13) % 320]}
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
        if out.token_ids[-1] == eos and len(out.token_ids) > 1:
            return prompt
    pytest.fail("no prompt of the tiny model reaches EOS greedily; the test needs one")


def test_sequence_stops_at_max_model_len(zoo_paths):
    from nanoengine import LLM
    from nanoengine.engine.naive import NaiveEngine

    llm = LLM(str(zoo_paths["llama-gqa"]), dtype="float32", max_model_len=10, fast_path=False)
    llm.llm_engine = NaiveEngine(llm.loaded, kv_cache="none")
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_outputs_follow_prompt_order_and_forms(llm):
    prompts = ["ab cd", {"prompt_token_ids": [9, 10]}, "東京"]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (2, 3, 4)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == ["ab cd", None, "東京"]
    assert outs[1].prompt_token_ids == [9, 10]
    assert [len(o.outputs[0].token_ids) <= n for o, n in zip(outs, (2, 3, 4))] == [True] * 3
    assert len({o.request_id for o in outs}) == 3 and all(o.finished for o in outs)


def test_chat_renders_the_template(llm):
    conversation = [{"role": "user", "content": "hello"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nhello<|im_end|>") and out.prompt.endswith("assistant\n")
    many = llm.chat([conversation, conversation], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert [m.outputs[0].token_ids for m in many] == [out.outputs[0].token_ids] * 2


@pytest.mark.parametrize(
    "prompts, params, message",
    [
        ("", None, "prompt 0 is empty"),
        ({"prompt_token_ids": [1, 5000]}, None, "outside the vocabulary"),
        ({"prompt_token_ids": list(range(256))}, None, "max_model_len is 256"),
        (42, None, "prompts must be"),
        (["a", "b"], [SamplingParams()], "list of 2"),
        ("a", SamplingParams(n=2), "SamplingParams.n=2: the one-at-a-time NaiveEngine"),
        ("a", SamplingParams(logit_bias={5000: 1.0}), "logit_bias has token ids outside the vocabulary"),
        ("a", SamplingParams(stop_token_ids=[5000]), "stop_token_ids has token ids outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error(llm, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {1: 500}}, "logit_bias"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": "x"}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]


@given(prompt=st.lists(st.integers(0, 9), max_size=6), output=st.lists(st.integers(0, 9), max_size=6),
       start=st.integers(-8, 8) | st.none(), stop=st.integers(-8, 8) | st.none(),
       step=st.sampled_from([None, 1, 2, -1]), index=st.integers(-14, 13))
def test_a_token_view_reads_like_the_concatenated_list(prompt, output, start, stop, step, index):
    """``Request.all_token_ids`` reads prompt and output in place; it must index, slice and
    fail exactly as ``prompt + output`` would."""
    view, full = TokenView(prompt, output), prompt + output
    assert len(view) == len(full) and list(view) == full
    assert view[start:stop:step] == full[start:stop:step]
    if -len(full) <= index < len(full):
        assert view[index] == full[index]
    else:
        with pytest.raises(IndexError):
            view[index]


@given(tokens=st.lists(st.integers(3, 300), min_size=1, max_size=12), stop_length=st.integers(1, 3))
def test_the_output_processor_reads_the_request_and_never_writes_it(llm, tokens, stop_length):
    """The request's owner (the scheduler, or this loop) appends each token and ends the
    request; the processor only reads it, and reports a stop string instead of ending it."""
    import dataclasses

    from nanoengine.engine.output_processor import OutputProcessor
    from nanoengine.request import append_token
    from nanoengine.request import Request

    tokenizer = llm.loaded.tokenizer
    stop = tokenizer.decode(tokens)[-stop_length:]  # the text's own tail: a stop string the run completes
    request = Request("r", None, [5, 6], SamplingParams(max_tokens=len(tokens), stop=[stop] if stop.strip() else []),
                      frozenset(), 0.0)
    processor = OutputProcessor(request, tokenizer, max_model_len=64)
    for token in tokens:
        ended = append_token(request, token, 64)
        before = dataclasses.astuple(request)
        stop_found = processor.observe(token, None, ended)
        assert dataclasses.astuple(request) == before
        if ended or stop_found is not None:
            break
