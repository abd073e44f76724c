"""Lesson 10 through the engine on the tiny zoo: greedy with speculation equals greedy without
it, token for token, for both proposers, alone and in mixed batches (chunked prefill,
preemption, parallel sampling, prefix caching, stops inside accepted guesses); random
sampling with speculation stays reproducible; the block pool ends consistent; the
configuration is checked; the counters add up.

The engine runs every task of the lesson, so these tests count for the lesson only;
test_l10_spec_decode.py tests each task alone. All on the float32 reference path.

The zoo's random models seldom repeat their prompt, so prompt lookup would rarely be right
on its own: several tests confine greedy decoding to a few tokens with a large logit bias,
which makes the text repetitive, and guesses both right and wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from nanoengine.engine.inputs import Prompt
from nanoengine.engine.llm_engine import LLMEngine, kv_bytes_per_slot
from nanoengine.sampling_params import SamplingParams
from nanoengine.trace import replay
from tests.engines import alone, drive_outputs
from tests.oracles import NEAR_TIE

pytestmark = pytest.mark.l10

NAME = "llama-gqa"
BIAS = 30.0  # enough to confine greedy decoding to the biased tokens


def spec_engine(loaded, speculative=None, num_tokens=4096, block_size=4, max_num_seqs=8, budget=None,
                prefix_caching=False, trace=False, seed=0):
    """tests.engines.make_engine, speculating: ``num_tokens`` slots in the pool whatever the
    draft's own cache takes, so engines with and without a draft hold the same blocks."""
    per_token = kv_bytes_per_slot(loaded)
    if speculative is not None and speculative.method == "draft_model":
        per_token += kv_bytes_per_slot(loaded, speculative.draft_num_layers)
    return LLMEngine(
        loaded,
        CacheConfig(block_size=block_size, kv_cache_memory_bytes=num_tokens * per_token,
                    enable_prefix_caching=prefix_caching),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        seed=seed, trace=trace, speculative=speculative,
    )


def outputs_of(engine, arrivals):
    """Every sequence's tokens, finish reason and stop reason: ``{request_id: [(...), ...]}``."""
    finished = drive_outputs(engine, arrivals)
    assert set(finished) == {a[1] for a in arrivals}
    pool = engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks, "every block is free once every request finished"
    return {
        request_id: [(c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]
        for request_id, out in finished.items()
    }


@torch.inference_mode()
def assert_same_greedy(hf_model, prompt, ours, theirs, logit_bias=None, what=""):
    """tests.oracles.assert_same_greedy with the request's logit bias added to the oracle's
    logits: equal token for token, except that a divergence at a near-tie (top-2 margin
    under 1e-4) ends the comparison there."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        logits = hf_model(torch.tensor([list(prompt) + list(theirs[:i])])).logits[0, -1].clone()
        for token, bias in (logit_bias or {}).items():
            logits[token] += bias
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        if margin < NEAR_TIE:
            return
        raise AssertionError(
            f"{what}first divergent token at output position {i}: with speculation {a}, without {b} "
            f"(margin {margin:.3g})\n  with:    {list(ours[i:i + 8])}\n  without: {list(theirs[i:i + 8])}"
        )
    assert len(ours) == len(theirs), f"{what}lengths differ: with speculation {len(ours)}, without {len(theirs)}"


def assert_same_outputs(hf_model, arrivals, with_spec, without):
    for _, request_id, prompt, params in arrivals:
        for (ours, reason, stop), (theirs, their_reason, their_stop) in zip(with_spec[request_id], without[request_id]):
            assert_same_greedy(hf_model, prompt, ours, theirs, params.logit_bias, f"request {request_id}: ")
            if ours == theirs:
                assert (reason, stop) == (their_reason, their_stop), request_id


def confined(tokens, **kwargs) -> SamplingParams:
    """Greedy decoding confined to ``tokens`` by a large logit bias (see the module's docstring)."""
    return SamplingParams(temperature=0, logit_bias={t: BIAS for t in tokens}, **kwargs)


# --- greedy with speculation == greedy without -------------------------------------------------

speculative_configs = st.one_of(
    st.builds(
        lambda k, lookup_max, lookup_min: SpeculativeConfig("ngram", k, lookup_max, min(lookup_min, lookup_max)),
        st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
    ),
    st.builds(lambda k, layers: SpeculativeConfig("draft_model", k, draft_num_layers=layers),
              st.integers(1, 4), st.sampled_from([1, 2])),
)


@st.composite
def repetitive_requests(draw):
    """1..4 requests whose prompts repeat a unit (so prompt lookup finds matches), arriving
    at different steps; greedy, plain or confined to a few tokens, of various lengths."""
    requests = []
    for i in range(draw(st.integers(1, 4))):
        unit = draw(st.lists(st.integers(1, 319), min_size=1, max_size=4))
        prompt = unit * draw(st.integers(1, 4)) + draw(st.lists(st.integers(1, 319), max_size=3))
        max_tokens = draw(st.integers(1, 14))
        alphabet = draw(st.one_of(st.none(), st.lists(st.sampled_from(sorted(set(prompt)) + [5, 6, 7]), min_size=2,
                                                      max_size=3, unique=True)))
        params = (SamplingParams(temperature=0, max_tokens=max_tokens) if alphabet is None
                  else confined(alphabet, max_tokens=max_tokens))
        requests.append((draw(st.integers(0, 3)), f"r{i}", prompt, params))
    return requests


def test_greedy_with_speculation_equals_greedy_without(ours, hf):
    """Hypothesis draws the requests, the proposer and k, the block size, a small token budget
    (chunked prefill beside speculating decodes) and prefix caching. Over the examples, both
    proposers must have had guesses accepted: the comparison is not vacuous."""
    loaded, hf_model = ours(NAME), hf(NAME)
    accepted = collections.Counter()

    @given(arrivals=repetitive_requests(), spec=speculative_configs, block_size=st.sampled_from([1, 2, 4]),
           budget=st.sampled_from([None, 8]), prefix_caching=st.booleans())
    def check(arrivals, spec, block_size, budget, prefix_caching):
        options = dict(block_size=block_size, budget=budget, prefix_caching=prefix_caching)
        engine = spec_engine(loaded, spec, **options)
        with_spec = outputs_of(engine, arrivals)
        without = outputs_of(spec_engine(loaded, None, **options), arrivals)
        assert_same_outputs(hf_model, arrivals, with_spec, without)
        stats = engine.spec_stats
        assert stats.num_accepted_tokens <= stats.num_draft_tokens
        accepted[spec.method] += stats.num_accepted_tokens

    check()
    assert accepted["ngram"] > 0 and accepted["draft_model"] > 0, accepted


@pytest.mark.parametrize("spec", [
    SpeculativeConfig("ngram", 3, prompt_lookup_max=3),
    SpeculativeConfig("draft_model", 4, draft_num_layers=1),
    SpeculativeConfig("draft_model", 2),  # the whole model: right wherever no logit bias intervenes
], ids=["ngram", "draft-1-layer", "draft-full"])
def test_a_mixed_batch_with_speculation_equals_one_without(spec, ours, hf):
    """Requests arrive while others decode: a long prompt chunk-prefilled under a budget of 8
    tokens, requests that may emit only 2 and 3 tokens (fewer guesses than k fit),
    parallel sampling (n=2) whose sequences guess after the fork, a prompt sharing a cached
    prefix. After every step the trace replays to the real pool, every live sequence's
    computed tokens sit in its blocks, and no guessed token is held past its step."""
    loaded, hf_model = ours(NAME), hf(NAME)
    long_prompt = [(7 * i) % 300 + 1 for i in range(40)]
    arrivals = [
        (0, "plain", [11, 12, 13, 11, 12, 13], SamplingParams(temperature=0, max_tokens=16)),
        (0, "confined", [5, 6, 7, 5, 6, 7, 5], confined([5, 6, 7], max_tokens=24)),
        (2, "long", long_prompt, SamplingParams(temperature=0, max_tokens=10)),
        (3, "two", [20, 21, 20, 21, 20], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)),
        (3, "three", [30, 31, 32], confined([30, 31], max_tokens=3, ignore_eos=True)),
        (4, "forked", [40, 41, 42, 40, 41], confined([40, 41, 42], max_tokens=12, n=2)),
        (6, "shared", long_prompt[:24] + [9, 9], SamplingParams(temperature=0, max_tokens=8)),
    ]
    options = dict(budget=8, prefix_caching=True)
    engine = spec_engine(loaded, spec, trace=True, **options)
    plans, execute = [], engine.runner.execute
    engine.runner.execute = lambda plan: plans.append(plan) or execute(plan)
    finished, step, pending = {}, 0, list(arrivals)
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params = pending.pop(0)
            engine.add_request(request_id, Prompt(None, prompt), params)
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
        _assert_replay_matches(engine)
        step += 1
        assert step < 500, "the engine stopped making progress"
    pool = engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks and not engine.kv_cache_manager.tables
    with_spec = {r: [(c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs] for r, out in finished.items()}
    without = outputs_of(spec_engine(loaded, None, **options), arrivals)
    assert_same_outputs(hf_model, arrivals, with_spec, without)
    assert len(with_spec["two"][0][0]) == 2 and len(with_spec["three"][0][0]) == 3, "guesses never run past max_tokens"
    assert with_spec["forked"][0][0] == with_spec["forked"][1][0], "greedy: both sequences agree"
    assert any(s.num_lookahead_tokens and s.request_id.endswith("_forked") for p in plans for s in p.scheduled)
    guessing = [p for p in plans if any(s.num_lookahead_tokens for s in p.scheduled)]
    assert any(len(s.token_ids) > 1 for p in guessing for s in p.scheduled), "a guess beside a prompt's chunk"
    assert any(not s.num_lookahead_tokens and len(s.token_ids) == 1 for p in guessing for s in p.scheduled), \
        "a guess beside a decode without guesses"
    # one layer of this random model seldom guesses right; and a draft ignores the requests'
    # logit bias, so its guesses for the confined requests are all rejected
    if spec.draft_num_layers != 1:
        assert engine.spec_stats.num_accepted_tokens > 0
    assert engine.spec_stats.num_draft_tokens > 0
    assert engine.kv_cache_manager.stats.hit_blocks > 0, "the shared prefix was a hit"


def _assert_replay_matches(engine):
    manager, scheduler = engine.kv_cache_manager, engine.scheduler
    last = replay(engine.trace)[-1]
    assert last.tables == manager.tables
    assert last.ref_cnt == [b.ref_cnt for b in manager.pool.blocks]
    for request_id, table in manager.tables.items():
        request = scheduler.requests[request_id]
        assert manager.num_tokens[request_id] == request.num_computed_tokens, "no slot held past the step"
        assert len(table) == -(-request.num_computed_tokens // manager.block_size), request_id
        stored = [t for b in table for t in last.tokens[b]]
        assert stored == request.all_token_ids[: request.num_computed_tokens], request_id


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_preempted_speculating_requests_still_equal_greedy_without(method, ours, hf):
    """A pool of 256 slots for four requests of 80 tokens each: some are preempted and
    recomputed (the draft model forgets them and catches up again). Prompt lookup's requests
    are confined to their prompt's tokens, the draft's are not (the draft ignores logit bias)."""
    loaded, hf_model = ours(NAME), hf(NAME)
    arrivals = []
    for i in range(4):
        prompt = [10 + i, 20 + i, 30 + i] * 10
        params = (confined(prompt[:3], max_tokens=50, ignore_eos=True) if method == "ngram"
                  else SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        arrivals.append((0, f"r{i}", prompt, params))
    spec = SpeculativeConfig(method, 3, prompt_lookup_max=2) if method == "ngram" else SpeculativeConfig(method, 3)
    engine = spec_engine(loaded, spec, num_tokens=256)
    with_spec = outputs_of(engine, arrivals)
    assert engine.scheduler.num_preemptions > 0
    without = outputs_of(spec_engine(loaded, None, num_tokens=256), arrivals)
    assert_same_outputs(hf_model, arrivals, with_spec, without)
    assert engine.spec_stats.num_accepted_tokens > 0
    if method == "draft_model":  # the whole model as its own draft, its cache caught up after preemption
        assert engine.spec_stats.acceptance_rate > 0.9


def test_a_full_depth_draft_is_almost_always_right_and_equals_decoding_alone(ours, hf):
    """Self-speculation with every layer guesses what the target computes: acceptance near 1,
    which shows the verifier accepts right guesses (not only that it rejects wrong ones); and
    each request's output is what lesson 02's one-at-a-time engine produces for it alone."""
    loaded, hf_model = ours(NAME), hf(NAME)
    engine = spec_engine(loaded, SpeculativeConfig("draft_model", 4, draft_num_layers=2))
    arrivals = [(0, f"r{i}", [3 + i, 50, 60 + i], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
                for i in range(3)]
    with_spec = outputs_of(engine, arrivals)
    stats = engine.spec_stats
    assert stats.acceptance_rate > 0.9 and stats.mean_acceptance_length > 3.5
    for _, request_id, prompt, params in arrivals:
        assert_same_greedy(hf_model, prompt, with_spec[request_id][0][0], alone(loaded, prompt, params))


@pytest.mark.parametrize("where", ["stop_token_ids", "eos"])
def test_a_stop_inside_accepted_guesses_ends_the_output_there(where, ours):
    """The full-depth draft guesses 4 tokens a step, all right: the step after the prompt's
    emits output positions 1..5 at once. A stop token (or EOS) at position 3 must end the
    output there, exactly as without speculation, dropping the tokens after it."""
    loaded = ours(NAME)
    prompt, greedy = [8, 9, 10], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = outputs_of(spec_engine(loaded), [(0, "r", prompt, greedy)])["r"][0][0]
    position = 3
    assert reference[position] not in reference[:position] and 0 not in reference[:position]
    stop = reference[position]
    if where == "eos":
        loaded = dataclasses.replace(loaded, eos_token_ids=frozenset({stop}))
        params = SamplingParams(temperature=0, max_tokens=12)
    else:
        params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])
    engine = spec_engine(loaded, SpeculativeConfig("draft_model", 4))
    with_spec = outputs_of(engine, [(0, "r", prompt, params)])
    without = outputs_of(spec_engine(loaded), [(0, "r", prompt, params)])
    assert with_spec == without
    tokens, reason, _ = with_spec["r"][0]
    assert tokens == reference[: position + 1] and reason == "stop"
    assert engine.spec_stats.history[0][1:] == (4, 4), "the stop was an accepted guess, not the step's last token"


def test_guesses_stop_at_the_models_length_limit(ours, hf):
    """A prompt 6 tokens short of max_model_len (256): the output ends at the limit with
    speculation exactly as without it, every guess inside the context."""
    loaded, hf_model = ours(NAME), hf(NAME)
    assert loaded.max_model_len == 256
    prompt = [5, 6, 7] * 83 + [5]  # 250 tokens
    arrivals = [(0, "edge", prompt, confined([5, 6, 7], max_tokens=100, ignore_eos=True))]
    engine = spec_engine(loaded, SpeculativeConfig("ngram", 4, prompt_lookup_max=3))
    with_spec = outputs_of(engine, arrivals)
    without = outputs_of(spec_engine(loaded), arrivals)
    assert_same_outputs(hf_model, arrivals, with_spec, without)
    assert len(with_spec["edge"][0][0]) == 6 and with_spec["edge"][0][1] == "length"
    assert engine.spec_stats.num_accepted_tokens > 0


def test_greedy_with_penalties_bias_and_min_tokens_equals_greedy_without(ours):
    """The verifier gives each position the sampler's full treatment: penalties counting the
    guesses before it, logit bias, and min_tokens' ban on stop tokens until the output is
    long enough."""
    loaded = ours(NAME)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=10, presence_penalty=0.4, frequency_penalty=0.3,
                            repetition_penalty=1.3, logit_bias={t: 12.0 for t in (5, 6, 7, 8)}, stop_token_ids=[6])
    arrivals = [(0, "a", [5, 6, 7, 8, 5, 6, 7, 8], params), (1, "b", [8, 7, 6, 5] * 3, params)]
    for spec in (SpeculativeConfig("ngram", 4, 2), SpeculativeConfig("draft_model", 3, draft_num_layers=1)):
        engine = spec_engine(loaded, spec)
        with_spec = outputs_of(engine, arrivals)
        assert with_spec == outputs_of(spec_engine(loaded), arrivals)
        assert engine.spec_stats.num_draft_tokens > 0
        for [(tokens, _, _)] in with_spec.values():
            assert 6 not in tokens[:10], "no stop token before min_tokens"


# --- random sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SpeculativeConfig("ngram", 3, 2), SpeculativeConfig("draft_model", 3)],
                         ids=["ngram", "draft-full"])
def test_seeded_sampling_with_speculation_is_reproducible(spec, ours):
    loaded = ours(NAME)
    arrivals = [
        (0, "seeded", [5, 6, 7, 5, 6, 7], SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True)),
        (1, "shared", [9, 8, 9, 8], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)),
        (1, "forked", [4, 4, 4], SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=10, ignore_eos=True)),
    ]
    first_engine = spec_engine(loaded, spec, seed=11)
    first = outputs_of(first_engine, arrivals)
    assert first == outputs_of(spec_engine(loaded, spec, seed=11), arrivals), "same seeds, same tokens"
    assert first["forked"][0][0] != first["forked"][1][0], "the two sequences draw differently"
    other_seed = [(0, "seeded", arrivals[0][2], dataclasses.replace(arrivals[0][3], seed=8))]
    assert outputs_of(spec_engine(loaded, spec, seed=11), other_seed)["seeded"] != first["seeded"]
    if spec.method == "draft_model":
        assert first_engine.spec_stats.acceptance_rate > 0.9, "the target as its own draft: guesses are right"


def test_random_sampling_with_prompt_lookup_keeps_every_sampling_option(ours):
    """Penalties, logit bias, min_tokens, stop tokens and logprobs all work through verification:
    one logprobs entry per output token, holding the chosen token, and no stop before
    min_tokens."""
    loaded = ours(NAME)
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=30, min_tokens=12, presence_penalty=0.2,
                            frequency_penalty=0.1, repetition_penalty=1.1, logit_bias={5: 6.0, 6: 6.0, 7: 6.0},
                            stop_token_ids=[7], logprobs=2)
    arrivals = [(0, f"r{i}", [5, 6, 5, 6, 5, 6, 5], dataclasses.replace(params, seed=i)) for i in range(4)]
    engine = spec_engine(loaded, SpeculativeConfig("ngram", 4, 3))
    finished = drive_outputs(engine, arrivals)
    for out in finished.values():
        completion = out.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids) >= 12
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert token in entry and entry[token].logprob <= 0
        assert completion.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)), abs=1e-4)
        assert 7 not in completion.token_ids[:12]
        assert completion.finish_reason == "length" or completion.token_ids[-1] == 7
    stats = engine.spec_stats
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.pool.num_blocks


# --- counters ----------------------------------------------------------------------------------


def test_the_counters_add_up(ours):
    loaded = ours(NAME)
    engine = spec_engine(loaded, SpeculativeConfig("ngram", 3, 2))
    arrivals = [(0, f"r{i}", [5, 6, 7] * 3, confined([5, 6, 7], max_tokens=20, ignore_eos=True)) for i in range(3)]
    finished = outputs_of(engine, arrivals)
    stats = engine.spec_stats
    assert stats.num_drafts == len(stats.history) > 0
    assert stats.num_draft_tokens == sum(k for _, k, _ in stats.history)
    assert stats.num_accepted_tokens == sum(a for _, _, a in stats.history)
    assert all(0 <= a <= k <= 3 for _, k, a in stats.history)
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    assert stats.acceptance_rate == pytest.approx(stats.num_accepted_tokens / stats.num_draft_tokens)
    # 60 tokens: one per request from its prompt's step, then per decode step its accepted
    # guesses and one more; a step that checked guesses is a decode step
    assert sum(len(tokens) for [(tokens, _, _)] in finished.values()) == 60
    assert 60 - 3 - stats.num_accepted_tokens >= stats.num_drafts


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "complaint"), [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of ngram, draft_model; got 'medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, r"unknown keys \['lookahead'\]"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer; got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(3\) must be at most prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_num_layers": 1}, "belong to method 'draft_model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 3},
     "draft_num_layers must be between 1 and the model's 2 layers; got 3"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 0}, "draft_num_layers must be"),
    ("ngram", "speculative_config must be a dict; got str"),
])
def test_a_bad_speculative_config_is_refused_naming_the_problem(config, complaint, zoo_paths):
    with pytest.raises(ValueError, match=complaint):
        LLM(str(zoo_paths[NAME]), dtype="float32", fast_path=False, speculative_config=config)


def test_llm_speculates_when_asked_and_generates_what_it_would_without(zoo_paths, llm_for):
    llm = LLM(str(zoo_paths[NAME]), dtype="float32", fast_path=False,
              speculative_config={"method": "draft_model", "num_speculative_tokens": 3})
    prompts = [{"prompt_token_ids": [5, 6, 7, 5, 6]}, {"prompt_token_ids": [40, 41, 42]}]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    plain = [o.outputs[0].token_ids for o in llm_for(NAME).generate(prompts, greedy, use_tqdm=False)]
    assert ours == plain
    stats = llm.llm_engine.spec_stats
    assert llm.llm_engine.speculative == SpeculativeConfig("draft_model", 3)
    assert stats.num_drafts > 0 and stats.acceptance_rate > 0.9
    assert SpeculativeConfig.from_dict(None) is None


def test_the_server_exposes_the_acceptance_counters():
    """/metrics carries vLLM's spec-decode counters (``nanoengine:`` prefix) and the mean
    acceptance length, from the engine's snapshot."""
    from prometheus_client.parser import text_string_to_metric_families

    from nanoengine.engine.async_engine import EngineMetrics
    from nanoengine.server.metrics import ServerMetrics

    snapshot = EngineMetrics(num_blocks=8, spec_decode_num_drafts=4, spec_decode_num_draft_tokens=12,
                             spec_decode_num_accepted_tokens=6)
    text = ServerMetrics(lambda: snapshot, 16, "m").render()[0].decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["nanoengine:spec_decode_num_drafts_total"] == 4
    assert samples["nanoengine:spec_decode_num_draft_tokens_total"] == 12
    assert samples["nanoengine:spec_decode_num_accepted_tokens_total"] == 6
    assert samples["nanoengine:spec_decode_mean_acceptance_length"] == 1 + 6 / 4


@pytest.mark.parametrize("text, message", [
    ('{"method": "ngram", "num_speculative_tokens": 3}', None),
    ('{"method": "ngram"', "not valid JSON"),
    ('{"method": "medusa", "num_speculative_tokens": 3}', "method must be one of"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "k": 1}', "unknown keys"),
])
def test_the_serve_flag_is_checked_before_any_weights_load(text, message, capsys):
    """``nanoengine serve --speculative-config JSON``: a good one reaches ``LLM``'s keywords;
    a bad one stops argparse with the reason, before the engine starts."""
    from nanoengine.cli import build_parser
    from nanoengine.server.launcher import engine_kwargs

    argv = ["serve", "--speculative-config", text]
    if message is None:
        assert engine_kwargs(build_parser().parse_args(argv))["speculative_config"] == json.loads(text)
        return
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err
