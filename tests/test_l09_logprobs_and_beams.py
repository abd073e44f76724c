"""Lesson 09 through the engine on the tiny zoo: logprobs and prompt logprobs against
transformers' log_softmax, beam search against transformers' ``generate(num_beams=...)``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import GenerationConfig

from nanoengine.sampling.beam_search import BeamSearchParams, BeamSearchSequence, beam_search_score, expand_beams
from nanoengine.outputs import Logprob
from nanoengine.sampling_params import SamplingParams
from tests.engines import drive_outputs, make_engine

pytestmark = pytest.mark.l09

PROMPT = [5, 17, 42, 9, 100, 3, 77]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_logprobs_equal_transformers_log_softmax(name, llm_for, hf):
    params = SamplingParams(temperature=0, max_tokens=5, min_tokens=5, logprobs=3, prompt_logprobs=2)
    out = llm_for(name).generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    completion = out.outputs[0]
    sequence = PROMPT + completion.token_ids
    with torch.inference_mode():
        expected = hf(name)(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
    assert len(completion.logprobs) == 5
    total = 0.0
    for i, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = expected[len(PROMPT) - 1 + i]
        assert token in position and len(position) in (3, 4), "the chosen token and the top 3"
        for candidate, logprob in position.items():
            assert logprob.logprob == pytest.approx(float(row[candidate]), abs=1e-4)
            assert logprob.rank == 1 + int((row > row[candidate] + 1e-4).sum()) or abs(
                float(row.topk(logprob.rank).values[-1] - row[candidate])) < 1e-4
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(position), f"position {i}: top-3 {top3} not all reported"
        total += position[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[p]
        assert entry[PROMPT[p]].logprob == pytest.approx(float(expected[p - 1, PROMPT[p]]), abs=1e-4)
        assert set(expected[p - 1].topk(2).indices.tolist()) <= set(entry)


def test_without_logprobs_there_are_none(llm_for):
    out = llm_for("llama-gqa").generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None and out.prompt_logprobs is None


@torch.inference_mode()
def _hf_beam(hf_model, prompt, beam_width, num_tokens):
    """transformers' beam search with EOS switched off, so every beam runs ``num_tokens``."""
    config = GenerationConfig(num_beams=beam_width, do_sample=False, max_new_tokens=num_tokens,
                              eos_token_id=None, pad_token_id=0, length_penalty=1.0)
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "qwen3-qknorm"])
def test_beam_search_best_sequence_equals_transformers(name, llm_for, hf):
    llm = llm_for(name)
    for prompt in (PROMPT, [200, 1, 2]):
        ours = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
        best = ours[0].sequences[0]
        assert len(ours[0].sequences) == 3 and best.tokens[: len(prompt)] == prompt
        assert best.tokens[len(prompt):] == _hf_beam(hf(name), prompt, 3, 6)


@pytest.mark.l09_t3
def test_beam_step_keeps_the_best_and_sets_finished_aside():
    def proposals(**logprobs):
        return {int(t[1:]): Logprob(v) for t, v in logprobs.items()}

    beams = [BeamSearchSequence([1, 2], cum_logprob=-1.0), BeamSearchSequence([1, 3], cum_logprob=-2.0)]
    live, finished = expand_beams(
        beams, [proposals(t5=-0.1, t0=-0.2, t6=-3.0), proposals(t7=-0.05, t8=-0.5)], beam_width=2, eos_token_ids={0}
    )
    assert [b.tokens for b in live] == [[1, 2, 5], [1, 3, 7]]
    assert [b.cum_logprob for b in live] == pytest.approx([-1.1, -2.05])
    assert [b.tokens for b in finished] == [[1, 2, 0]] and finished[0].finish_reason == "stop"
    live, finished = expand_beams(beams, [proposals(t0=-0.2), proposals(t8=-0.5)], 2, {0}, ignore_eos=True)
    assert finished == [] and [b.tokens for b in live] == [[1, 2, 0], [1, 3, 8]]


@pytest.mark.l09_t3
@given(data=st.data(), beam_width=st.integers(1, 4), length_penalty=st.sampled_from([0.0, 1.0, 2.0]),
       ignore_eos=st.booleans())
def test_expanding_beams_keeps_the_best_scored_candidates(data, beam_width, length_penalty, ignore_eos):
    """Every beam extended by each of its proposals is a candidate: those ending in EOS (token
    0) are set aside as finished, unless EOS is ignored; the ``beam_width`` best-scored of the
    others live on, best first."""
    beams = [BeamSearchSequence([1] * data.draw(st.integers(1, 3)) + [10 + i],  # parents of different lengths
                                cum_logprob=data.draw(st.floats(-8, 0)))
             for i in range(data.draw(st.integers(1, 3)))]
    logprob = st.sampled_from([-0.25, -0.5, -1.0, -2.0]).map(Logprob)
    proposals = [data.draw(st.dictionaries(st.integers(0, 5), logprob, min_size=1, max_size=4)) for _ in beams]
    live, finished = expand_beams(beams, proposals, beam_width, {0}, length_penalty, ignore_eos)
    candidates = {
        tuple(beam.tokens + [token]): (beam.cum_logprob + logprob.logprob, beam.logprobs + [beam_proposals])
        for beam, beam_proposals in zip(beams, proposals) for token, logprob in beam_proposals.items()
    }
    for beam in live + finished:
        assert (beam.cum_logprob, beam.logprobs) == candidates[tuple(beam.tokens)]
    ends = {tokens for tokens in candidates if tokens[-1] == 0 and not ignore_eos}
    assert sorted(tuple(b.tokens) for b in finished) == sorted(ends)
    assert all(b.finish_reason == "stop" for b in finished) and all(b.finish_reason is None for b in live)

    def score(tokens):
        beam = BeamSearchSequence(list(tokens), cum_logprob=candidates[tokens][0])
        return beam_search_score(beam, {0}, length_penalty)

    kept = [tuple(b.tokens) for b in live]
    dropped = set(candidates) - ends - set(kept)
    assert len(kept) == len(set(kept)) == min(beam_width, len(candidates) - len(ends))
    assert [score(t) for t in kept] == sorted((score(t) for t in kept), reverse=True), "best first"
    assert all(score(kept[-1]) >= score(t) for t in dropped), "a better candidate was dropped"


def test_length_penalty_divides_by_length_without_the_final_eos():
    beam = BeamSearchSequence([1, 2, 3, 0], cum_logprob=-6.0)
    assert beam_search_score(beam, {0}, 1.0) == pytest.approx(-2.0)
    assert beam_search_score(beam, {0}, 2.0) == pytest.approx(-6.0 / 9)
    assert beam_search_score(beam, set(), 0.0) == pytest.approx(-6.0)


def test_beam_search_params_name_the_bad_field():
    for kwargs, field in (({"beam_width": 0, "max_tokens": 2}, "beam_width"), ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
                          ({"beam_width": 2, "max_tokens": 2, "length_penalty": math.nan}, "length_penalty")):
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)


def test_beam_search_stops_at_eos_and_returns_text(llm_for):
    llm = llm_for("llama-gqa")
    out = llm.beam_search(["hello there"], BeamSearchParams(beam_width=2, max_tokens=4))[0]
    assert len(out.sequences) == 2
    for beam in out.sequences:
        assert beam.finish_reason in ("stop", "length") and isinstance(beam.text, str)
        assert len(beam.logprobs) == len(beam.tokens) - len(llm.get_tokenizer()("hello there")["input_ids"])


def test_prompt_logprobs_are_whole_when_the_prompt_is_chunked(llm_for, ours):
    prompt = list(range(30, 60))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    whole = llm_for("llama-gqa").generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].prompt_logprobs
    chunked = drive_outputs(make_engine(ours("llama-gqa"), budget=9), [(0, "r", prompt, params)])["r"].prompt_logprobs
    assert len(chunked) == len(whole) == len(prompt)
    for a, b in zip(chunked[1:], whole[1:]):
        assert a.keys() == b.keys()
        assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-5)
