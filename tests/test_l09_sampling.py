"""Lesson 09: the full sampler: penalties, logit bias, the exponential race and logprobs."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanoengine import SamplingParams
from nanoengine.sampling import SamplingRow, gather_logprobs, sample
from nanoengine.sampling.processors import apply_logit_bias, apply_penalties, token_counts
from nanoengine.sampling.sampler import sampling_probs
from tests.oracles import NEAR_TIE
from tests.test_l01_decode import logits_batches

pytestmark = pytest.mark.l09

PENALTY = st.floats(-2.0, 2.0, width=32)
REPETITION = st.floats(0.125, 3.0, width=32)  # bounds exact in float32, as width=32 requires


def _token_lists(num_rows: int, vocab: int):
    return st.lists(st.lists(st.integers(0, vocab - 1), max_size=12), min_size=num_rows, max_size=num_rows)


def _penalised(logit: float, token: int, prompt: list[int], output: list[int], presence: float,
               frequency: float, repetition: float) -> float:
    """vLLM's penalties for one token, spelled out: the oracle for the vectorised version."""
    if token in prompt or token in output:
        logit = logit / repetition if logit > 0 else logit * repetition
    count = output.count(token)
    return logit - frequency * count - presence * (count > 0)


# --- L09.T1: penalties and logit bias --------------------------------------------------------

@pytest.mark.l09_t1
@given(logits=logits_batches(), data=st.data())
def test_repetition_penalty_equals_transformers(logits, data):
    num_rows, vocab = logits.shape
    penalties = data.draw(st.lists(REPETITION, min_size=num_rows, max_size=num_rows))
    prompts, outputs = data.draw(_token_lists(num_rows, vocab)), data.draw(_token_lists(num_rows, vocab))
    expected = torch.cat([
        RepetitionPenaltyLogitsProcessor(r)(torch.tensor([p + o], dtype=torch.long), logits[i : i + 1].clone())
        for i, (r, p, o) in enumerate(zip(penalties, prompts, outputs))
    ])
    zeros = torch.zeros(num_rows)
    ours = apply_penalties(logits, token_counts(prompts, vocab) > 0, token_counts(outputs, vocab), zeros, zeros,
                           torch.tensor(penalties))
    torch.testing.assert_close(ours, expected)


@pytest.mark.l09_t1
@given(logits=logits_batches(), data=st.data())
def test_penalties_equal_a_direct_computation(logits, data):
    num_rows, vocab = logits.shape
    prompts, outputs = data.draw(_token_lists(num_rows, vocab)), data.draw(_token_lists(num_rows, vocab))
    presence, frequency = (data.draw(st.lists(PENALTY, min_size=num_rows, max_size=num_rows)) for _ in range(2))
    repetition = data.draw(st.lists(REPETITION, min_size=num_rows, max_size=num_rows))
    expected = torch.tensor([
        [_penalised(float(logits[i, t]), t, prompts[i], outputs[i], presence[i], frequency[i], repetition[i])
         for t in range(vocab)]
        for i in range(num_rows)
    ])
    ours = apply_penalties(logits, token_counts(prompts, vocab) > 0, token_counts(outputs, vocab),
                           torch.tensor(presence), torch.tensor(frequency), torch.tensor(repetition))
    torch.testing.assert_close(ours, expected)


@given(vocab=st.integers(1, 30), data=st.data())
def test_token_counts_count_each_list(vocab, data):
    lists = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=20), max_size=5))
    expected = [[collections.Counter(ids)[t] for t in range(vocab)] for ids in lists]
    assert token_counts(lists, vocab).tolist() == expected


@given(logits=logits_batches(), data=st.data())
def test_logit_bias_adds_to_the_named_tokens(logits, data):
    num_rows, vocab = logits.shape
    bias = st.dictionaries(st.integers(0, vocab - 1), st.floats(-100, 100, width=32), max_size=vocab)
    biases = data.draw(st.lists(st.none() | bias, min_size=num_rows, max_size=num_rows))
    expected = logits.clone()
    for i, row_bias in enumerate(biases):
        for token, value in (row_bias or {}).items():
            expected[i, token] += value
    torch.testing.assert_close(apply_logit_bias(logits, biases), expected)


def test_logit_bias_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_logit_bias(torch.zeros(2, 5), [None, {5: 1.0}])


@st.composite
def greedy_rows(draw, vocab: int) -> SamplingRow:
    """A greedy row with any mix of logit bias, banned tokens and penalties (or none of them)."""
    token = st.integers(0, vocab - 1)
    penalty = st.just(0.0) | PENALTY
    params = SamplingParams(
        temperature=0.0,
        presence_penalty=draw(penalty),
        frequency_penalty=draw(penalty),
        repetition_penalty=draw(st.just(1.0) | REPETITION),
        logit_bias=draw(st.none() | st.dictionaries(token, st.floats(-100, 100, width=32), max_size=4)),
    )
    banned = draw(st.lists(token, max_size=vocab - 1, unique=True))
    return SamplingRow(params, None, banned, draw(st.lists(token, max_size=8)), draw(st.lists(token, max_size=8)))


def _processed(logits: torch.Tensor, row: SamplingRow) -> list[float]:
    """Row ``logits`` after bias, bans and penalties, token by token in Python."""
    params, bias = row.params, row.params.logit_bias or {}
    prompt, output = list(row.prompt_token_ids), list(row.output_token_ids)
    return [
        float("-inf") if t in row.banned_token_ids else _penalised(
            float(logits[t]) + bias.get(t, 0.0), t, prompt, output,
            params.presence_penalty, params.frequency_penalty, params.repetition_penalty)
        for t in range(len(logits))
    ]


@pytest.mark.l09_t1
@given(logits=logits_batches(), data=st.data())
def test_greedy_rows_take_the_argmax_after_bias_bans_and_penalties(logits, data):
    """Rows with and without penalties share the batch: each gets exactly its own processing."""
    num_rows, vocab = logits.shape
    rows = data.draw(st.lists(greedy_rows(vocab), min_size=num_rows, max_size=num_rows))
    out = sample(logits, rows, torch.Generator().manual_seed(0))
    for i, (token, row) in enumerate(zip(out.token_ids, rows)):
        expected = _processed(logits[i], row)
        assert token not in row.banned_token_ids
        assert expected[token] >= max(expected) - NEAR_TIE, f"row {i}: chose {token}, expected {expected}"


# --- L09.T2: the draw and logprobs -----------------------------------------------------------

@given(logits=logits_batches(), data=st.data())
def test_random_rows_are_drawn_from_transformers_warped_distribution(logits, data):
    """temperature -> min-p -> top-k -> top-p (vLLM's order), each as transformers computes it."""
    num_rows, vocab = logits.shape
    params = [
        SamplingParams(
            temperature=data.draw(st.floats(0.0625, 3.0, width=32)),
            min_p=data.draw(st.just(0.0) | st.floats(0.0, 1.0, width=32)),
            top_k=data.draw(st.integers(0, vocab + 2)),
            top_p=data.draw(st.just(1.0) | st.floats(0.0078125, 1.0, width=32)),
        )
        for _ in range(num_rows)
    ]
    ours = sampling_probs(logits, params)
    for i, p in enumerate(params):
        warpers = [TemperatureLogitsWarper(p.temperature), MinPLogitsWarper(p.min_p)]
        warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
        warpers += [TopPLogitsWarper(p.top_p)]
        row = logits[i : i + 1].clone()
        for warper in warpers:
            row = warper(None, row)
        expected = row.softmax(dim=-1)[0]
        assert torch.equal(ours[i] == 0, expected == 0), f"row {i}: different tokens removed"
        torch.testing.assert_close(ours[i], expected)


def test_min_p_comes_before_top_p_as_in_vllm():
    """min-p first drops 0.1 and renormalises, so top-p = 0.8 then drops 0.15 too.
    transformers' order (top-p, then min-p) would keep the 0.15 token."""
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    probs = sampling_probs(logits, [SamplingParams(min_p=0.25, top_p=0.8)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]


DRAWS = 20_000
TINY_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _tiny_vocab_oracle(params: SamplingParams) -> torch.Tensor:
    """The distribution on a 6-token vocabulary, by transformers' warpers (no min-p: HF's order is then vLLM's)."""
    row = TINY_LOGITS[None].clone()
    for warper in (TemperatureLogitsWarper(params.temperature), TopKLogitsWarper(params.top_k or 6),
                   TopPLogitsWarper(params.top_p)):
        row = warper(None, row)
    return row.softmax(dim=-1)[0].double()


@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "own-generators"])
@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)], ids=["plain", "truncated"]
)
def test_draw_frequencies_match_the_distribution(params, seeded):
    """Chi-square over 20k draws at p = 0.001; tokens the oracle rules out are never drawn."""
    generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(DRAWS)]
    rows = [SamplingRow(params, g) for g in generators]
    tokens = sample(TINY_LOGITS.expand(DRAWS, -1), rows, torch.Generator().manual_seed(0)).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=len(TINY_LOGITS)).double()
    expected = _tiny_vocab_oracle(params) * DRAWS
    possible = expected > 0
    assert observed[~possible].sum() == 0
    assert chisquare(observed[possible].numpy(), expected[possible].numpy()).pvalue > 1e-3


def _random_params(vocab: int):
    return st.builds(
        SamplingParams,
        temperature=st.floats(0.3, 2.0),
        top_k=st.integers(0, vocab),
        top_p=st.floats(0.3, 1.0),
        min_p=st.just(0.0) | st.floats(0.0, 0.2),
    )


@given(data=st.data(), vocab=st.integers(2, 30), seed=st.integers(0, 2**32), position=st.integers(0, 4))
def test_a_seeded_row_ignores_the_rest_of_the_batch(data, vocab, seed, position):
    """Same seed -> same tokens, alone or at any position among any companions, step after step."""
    steps = 4
    logits = data.draw(st.lists(st.floats(-5, 5, width=32), min_size=vocab, max_size=vocab).map(torch.tensor))
    params = data.draw(_random_params(vocab))
    companions = data.draw(st.lists(
        st.tuples(_random_params(vocab) | st.just(SamplingParams(temperature=0)), st.booleans()), max_size=4))
    position = min(position, len(companions))

    alone_generator = torch.Generator().manual_seed(seed)
    alone = [sample(logits[None], [SamplingRow(params, alone_generator)], torch.Generator().manual_seed(1))
             .token_ids[0] for _ in range(steps)]

    generator, shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(2)
    companion_generators = [torch.Generator().manual_seed(seed + 1 + j) if own else None
                            for j, (_, own) in enumerate(companions)]
    batched = []
    for _ in range(steps):
        rows = [SamplingRow(p, g) for (p, _), g in zip(companions, companion_generators)]
        rows.insert(position, SamplingRow(params, generator))
        batch = torch.randn(len(rows), vocab)
        batch[position] = logits
        batched.append(sample(batch, rows, shared).token_ids[position])
    assert batched == alone


@given(logits=logits_batches(), data=st.data())
def test_banned_tokens_are_never_drawn(logits, data):
    num_rows, vocab = logits.shape
    banned = [data.draw(st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True))
              for _ in range(num_rows)]
    # Ban the likeliest tokens first: the draw would pick them if the ban leaked.
    banned = [logits[i].topk(len(b)).indices.tolist() for i, b in enumerate(banned)]
    rows = [SamplingRow(SamplingParams(temperature=2.0), None, b) for b in banned]
    for step in range(5):
        tokens = sample(logits, rows, torch.Generator().manual_seed(step)).token_ids
        assert all(t not in b for t, b in zip(tokens, banned))


@pytest.mark.l09_t2
@given(num_rows=st.integers(1, 4), vocab=st.integers(1, 12), data=st.data())
def test_gathered_logprobs_are_the_chosen_token_then_the_top_k_with_their_ranks(num_rows, vocab, data):
    """Logits drawn from a few levels, so ties are common: a rank counts the strictly larger
    logprobs, the top-k come in descending order, and each row keeps its own k."""
    levels = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0])
    logits = torch.tensor(data.draw(st.lists(st.lists(levels, min_size=vocab, max_size=vocab),
                                             min_size=num_rows, max_size=num_rows)))
    logprobs = logits.log_softmax(dim=-1)
    chosen = data.draw(st.lists(st.integers(0, vocab - 1), min_size=num_rows, max_size=num_rows))
    num_top = data.draw(st.lists(st.integers(0, vocab), min_size=num_rows, max_size=num_rows))
    gathered = gather_logprobs(logprobs, chosen, num_top)
    assert len(gathered) == num_rows
    for row, token, k, got in zip(logprobs.tolist(), chosen, num_top, gathered):
        assert len(got.token_ids) == len(got.logprobs) == len(got.ranks) == k + 1
        assert got.token_ids[0] == token and len(set(got.token_ids[1:])) == k
        assert got.logprobs == [row[t] for t in got.token_ids]
        assert got.logprobs[1:] == sorted(row, reverse=True)[:k]
        assert got.ranks == [1 + sum(x > row[t] for x in row) for t in got.token_ids]


@pytest.mark.l09_t2
@given(logits=logits_batches(), data=st.data())
def test_greedy_rows_report_the_raw_logprobs_of_what_bias_and_bans_made_them_choose(logits, data):
    num_rows, vocab = logits.shape
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={i % vocab: 100.0},
                                   logprobs=data.draw(st.integers(0, 3))), banned_token_ids=[(i + 1) % vocab])
        for i in range(num_rows)
    ]
    out = sample(logits, rows, torch.Generator().manual_seed(0))
    raw = logits.log_softmax(dim=-1)
    for i, (row, token, got) in enumerate(zip(rows, out.token_ids, out.logprobs)):
        assert token == i % vocab, "the bias decides the greedy choice (logits are within ±20)"
        assert got.token_ids[0] == token and got.logprobs[0] == pytest.approx(float(raw[i, token]), abs=1e-6)
        assert got.logprobs[1:] == pytest.approx(raw[i].topk(min(row.params.logprobs, vocab)).values.tolist(), abs=1e-6)


@given(logits=logits_batches(), data=st.data())
def test_logprobs_are_the_raw_distribution_at_the_chosen_and_top_tokens(logits, data):
    """Penalties, bias and temperature change the draw, never the reported logprobs (vLLM's raw logprobs)."""
    num_rows, vocab = logits.shape
    rows = [
        SamplingRow(
            SamplingParams(
                temperature=data.draw(st.sampled_from([0.0, 0.5, 1.5])),
                presence_penalty=1.0,
                logit_bias={0: 5.0},
                logprobs=data.draw(st.none() | st.just(0) | st.integers(0, vocab + 2)),
            ),
            output_token_ids=[1 % vocab],
        )
        for _ in range(num_rows)
    ]
    out = sample(logits, rows, torch.Generator().manual_seed(0))
    raw = torch.log_softmax(logits.float(), dim=-1)
    for i, (row, token, got) in enumerate(zip(rows, out.token_ids, out.logprobs)):
        k = row.params.logprobs
        if k is None:
            assert got is None
            continue
        assert len(got.token_ids) == len(got.logprobs) == len(got.ranks) == min(k, vocab) + 1
        assert got.token_ids[0] == token
        torch.testing.assert_close(torch.tensor(got.logprobs), raw[i, got.token_ids], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(got.logprobs[1:]), raw[i].topk(min(k, vocab)).values,
                                   atol=1e-6, rtol=0)
        assert got.ranks == [1 + int((raw[i] > raw[i, t]).sum()) for t in got.token_ids]


def test_a_top_k_beyond_the_vocabulary_keeps_everything():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    huge = SamplingParams(temperature=1.0, top_k=10**30, seed=1)
    out = sample(logits, [SamplingRow(huge, torch.Generator().manual_seed(1))], torch.Generator())
    assert out.token_ids[0] in (0, 1, 2)
