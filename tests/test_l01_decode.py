"""Lesson 01: the decode loop, sampling processors and incremental detokenization."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanoengine import SamplingParams
from nanoengine.engine.detokenizer import IncrementalDetokenizer
from nanoengine.engine.naive import recompute_decode
from nanoengine.sampling import SamplingRow, sample
from nanoengine.sampling.processors import apply_min_p, apply_temperature, apply_top_k, apply_top_p
from tests.conftest import ZOO_NAMES
from tests.oracles import assert_same_greedy, hf_greedy

pytestmark = pytest.mark.l01


def _greedy_without_eos(eos_ids):
    def next_token(logits: torch.Tensor) -> int:
        logits = logits.clone()
        logits[list(eos_ids)] = float("-inf")
        return int(logits.argmax())

    return next_token


# --- L01.T1: the recompute loop ---------------------------------------------------------

@pytest.mark.l01_t1
@pytest.mark.parametrize("name", ZOO_NAMES)
@given(prompt=st.lists(st.integers(0, 319), min_size=1, max_size=32), num_tokens=st.integers(1, 16))
def test_recompute_loop_equals_transformers_greedy(name, prompt, num_tokens, ours, hf):
    loaded = ours(name)
    stream = recompute_decode(loaded.model, prompt, _greedy_without_eos(loaded.eos_token_ids))
    tokens = list(itertools.islice(stream, num_tokens))
    assert_same_greedy(hf(name), prompt, tokens, hf_greedy(hf(name), prompt, num_tokens))


# --- L01.T2: logits processors against transformers' warpers -----------------------------

def _logits(draw_rows: int, vocab: int):
    return st.lists(
        st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=vocab, max_size=vocab),
        min_size=draw_rows, max_size=draw_rows,
    ).map(lambda rows: torch.tensor(rows, dtype=torch.float32))


@st.composite
def logits_batches(draw):
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 40))
    return draw(_logits(rows, vocab))


def _rowwise(warper_for, logits: torch.Tensor, values: list) -> torch.Tensor:
    return torch.cat([warper_for(v)(None, logits[i : i + 1].clone()) for i, v in enumerate(values)])


@pytest.mark.l01_t2
@given(logits=logits_batches(), data=st.data())
def test_temperature_equals_transformers(logits, data):
    temps = data.draw(st.lists(st.floats(0.05, 3.0), min_size=len(logits), max_size=len(logits)))
    expected = _rowwise(TemperatureLogitsWarper, logits, temps)
    torch.testing.assert_close(apply_temperature(logits, torch.tensor(temps)), expected)


@pytest.mark.l01_t2
@given(logits=logits_batches(), data=st.data())
def test_top_k_equals_transformers(logits, data):
    vocab = logits.shape[1]
    ks = data.draw(st.lists(st.integers(0, vocab + 3), min_size=len(logits), max_size=len(logits)))
    expected = torch.cat([
        logits[i : i + 1] if k == 0 else TopKLogitsWarper(k)(None, logits[i : i + 1].clone()) for i, k in enumerate(ks)
    ])
    torch.testing.assert_close(apply_top_k(logits, torch.tensor(ks)), expected)


@pytest.mark.l01_t2
@given(logits=logits_batches(), data=st.data())
def test_top_p_equals_transformers(logits, data):
    # tiny p included: then only the "always keep the most likely token" rule keeps a row alive
    ps = data.draw(st.lists(st.one_of(st.floats(1e-9, 1e-6), st.floats(0.01, 1.0)),
                            min_size=len(logits), max_size=len(logits)))
    expected = _rowwise(TopPLogitsWarper, logits, ps)
    torch.testing.assert_close(apply_top_p(logits, torch.tensor(ps, dtype=torch.float32)), expected)


@given(logits=logits_batches(), data=st.data())
def test_min_p_equals_transformers(logits, data):
    ps = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(logits), max_size=len(logits)))
    expected = _rowwise(MinPLogitsWarper, logits, ps)
    torch.testing.assert_close(apply_min_p(logits, torch.tensor(ps, dtype=torch.float32)), expected)


@pytest.mark.l01_t2
def test_sampler_mixes_greedy_and_random_rows_and_respects_bans():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0)]
    banned = [[], [], [int(logits[2].argmax())]]
    rows = [SamplingRow(p, banned_token_ids=b) for p, b in zip(params, banned)]
    tokens = sample(logits, rows, torch.Generator().manual_seed(0)).token_ids
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] in logits[1].topk(5).indices.tolist()
    assert tokens[2] == int(logits[2].topk(2).indices[1])


@pytest.mark.l01_t2
def test_seeded_sampling_is_reproducible_and_seed_dependent():
    """A row with its own generator draws the same tokens from the same seed, step after step."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_k=40, top_p=0.95)

    def run(seed):
        row = SamplingRow(params, torch.Generator().manual_seed(seed))
        return [sample(logits, [row], torch.Generator().manual_seed(step)).token_ids[0] for step in range(24)]

    assert run(1) == run(1)
    assert run(1) != run(2)


# --- L01.T3: incremental detokenization ----------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(list("ab cdé東京🚀🌍ΩжZ\n.,") + ["ü", "北"]), min_size=1, max_size=40)


@pytest.mark.l01_t3
@given(prompt_text=TEXT, output_text=TEXT)
def test_streamed_text_equals_decoding_at_once(prompt_text, output_text, zoo_paths):
    tokenizer = _tokenizer(zoo_paths)
    prompt = tokenizer(prompt_text)["input_ids"]
    output = tokenizer(output_text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in output] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(output)
    assert all("\ufffd" not in d for d in deltas[:-1])


@pytest.mark.l01_t3
@given(ids=st.lists(st.integers(3, 319), min_size=1, max_size=30))
def test_streamed_text_equals_decoding_for_arbitrary_token_ids(ids, zoo_paths):
    """Random ids split characters anywhere; the stream must still add up to decode(ids)."""
    tokenizer = _tokenizer(zoo_paths)
    detok = IncrementalDetokenizer(tokenizer, [5])
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids)


def _tokenizer(zoo_paths):
    return AutoTokenizer.from_pretrained(zoo_paths["llama-gqa"])
