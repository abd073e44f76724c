"""Lesson 10 without a model: the n-gram proposer (L10.T1), the rejection rule by exact
enumeration on tiny vocabularies (L10.T2), giving back rejected guesses' KV slots (L10.T3),
and around them the verifier, the scheduler's lookahead slots and the block pool as a state
machine with speculation.

Each task's tests call its region directly (the KV tests start from tables held by hand),
so that they run nothing else of the lesson first; the tests marked only ``l10`` go
through several regions. test_l10_spec_engine.py runs the whole engine.
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.cache.prefix_hash import block_hashes
from nanoengine.request import Request, RequestStatus
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.output import ScheduledRequest
from nanoengine.spec_decode.ngram import NgramProposer, propose_ngram
from nanoengine.spec_decode.proposer import Proposal, ProposalRequest
from nanoengine.spec_decode.rejection import speculative_distributions
from nanoengine.spec_decode.stats import SpecDecodeStats
from nanoengine.spec_decode.verifier import verify
from nanoengine.trace import Trace, replay
from tests.test_l08_block_sharing import SharingMachine

pytestmark = pytest.mark.l10


# --- L10.T1: prompt lookup ---------------------------------------------------------------------


def _lookup_oracle(tokens: list[int], max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup by brute force: every (n, start) where the last n tokens occur again
    earlier, the longest n first, then the latest start; guesses are what followed it."""
    length = len(tokens)
    matches = [
        (n, start)
        for n in range(min_n, max_n + 1)
        for start in range(length - n)  # an earlier occurrence: something follows it
        if tokens[start : start + n] == tokens[length - n :]
    ]
    if not matches:
        return []
    n, start = max(matches)
    return tokens[start + n : start + n + max_tokens]


@pytest.mark.l10_t1
@pytest.mark.parametrize(("tokens", "max_tokens", "min_n", "max_n", "expected"), [
    # the suffix [1 2 3] occurred at the start: guess what followed it, up to max_tokens
    ([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, 3, [4, 9, 1]),
    ([1, 2, 3, 4, 9, 1, 2, 3], 1, 1, 3, [4]),
    # the longest n wins over a later match of a shorter one: [1 2 3] -> 10; [3] alone -> 11
    ([1, 2, 3, 10, 9, 3, 11, 1, 2, 3], 2, 1, 3, [10, 9]),
    ([1, 2, 3, 10, 9, 3, 11, 1, 2, 3], 2, 1, 1, [11, 1]),
    ([1, 2, 3, 10, 9, 3, 11, 1, 2, 3], 2, 1, 8, [10, 9]),  # max_n beyond the sequence is fine
    # the latest earlier occurrence wins
    ([1, 5, 1, 6, 1], 2, 1, 2, [6, 1]),
    ([4, 4, 4, 4], 3, 2, 2, [4]),  # [4 4] last occurred at 1, overlapping the suffix
    # fewer guesses at the end of the sequence
    ([1, 2, 1], 5, 1, 2, [2, 1]),
    # none when nothing matches, or only something shorter than min_n
    ([1, 2, 3], 4, 1, 3, []),
    ([1, 2, 3, 4, 3], 4, 2, 3, []),
    ([1, 2, 3, 4, 3], 4, 1, 3, [4, 3]),
    ([7], 4, 1, 3, []),
    ([], 4, 1, 3, []),
    ([5, 5], 0, 1, 1, []),
])
def test_prompt_lookup_by_hand(tokens, max_tokens, min_n, max_n, expected):
    assert propose_ngram(tokens, max_tokens, min_n, max_n) == expected


@pytest.mark.l10_t1
@given(tokens=st.lists(st.integers(0, 3), max_size=24), max_tokens=st.integers(0, 6), min_n=st.integers(1, 4),
       extra_n=st.integers(0, 3))
def test_prompt_lookup_equals_brute_force(tokens, max_tokens, min_n, extra_n):
    """Three token ids, so suffixes recur often and at several lengths."""
    max_n = min_n + extra_n
    guesses = propose_ngram(tokens, max_tokens, min_n, max_n)
    assert guesses == _lookup_oracle(tokens, max_tokens, min_n, max_n)
    assert len(guesses) <= max_tokens
    assert propose_ngram(tuple(tokens), max_tokens, min_n, max_n) == guesses, "any sequence of ids"


@pytest.mark.l10_t1
def test_the_ngram_proposer_guesses_for_each_request_from_its_own_tokens():
    proposer = NgramProposer(min_n=1, max_n=2)
    greedy = SamplingParams(temperature=0)
    requests = [
        ProposalRequest("a", [1, 2, 3, 1, 2], 2, greedy, [0, 1]),
        ProposalRequest("b", [9, 8, 7], 3, greedy, [2]),
        ProposalRequest("c", [4, 4, 4, 4, 4, 4], 3, greedy, [3, 4, 5]),
    ]
    proposals = proposer.propose(requests)
    assert [p.token_ids for p in proposals] == [[3, 1], [], [4]], "c: [4 4] last occurred just before the end"
    assert all(p.probs is None for p in proposals), "prompt lookup's guesses are certain (one-hot)"


# --- L10.T2: the rejection rule, by exact enumeration ---------------------------------------


def _distribution(weights: list[int]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


@st.composite
def speculation_problems(draw):
    """A vocabulary of 2..4 tokens, k in 1..3, and the target's and the draft's conditionals
    after every prefix (keyed by the prefix as a tuple). Small integer weights make zeros
    common in both (a draft putting mass where the target puts none, and the reverse), and
    a prefix where the draft equals the target happens too."""
    vocab, k = draw(st.integers(2, 4)), draw(st.integers(1, 3))
    weights = st.lists(st.integers(0, 4), min_size=vocab, max_size=vocab).map(lambda w: w if any(w) else [1] * vocab)
    prefixes = [prefix for n in range(k + 1) for prefix in itertools.product(range(vocab), repeat=n)]
    p = {prefix: _distribution(draw(weights)) for prefix in prefixes}
    q = {
        prefix: p[prefix].clone() if draw(st.integers(0, 4)) == 0 else _distribution(draw(weights))
        for prefix in prefixes if len(prefix) < k
    }
    return vocab, k, p, q


def _emitted(vocab: int, k: int, p: dict, q: dict) -> dict[tuple, float]:
    """The exact probability of every token sequence one verification emits: over every
    guess sequence ``d`` the draft can make, accepting exactly ``a`` of them, then one token."""
    emitted: dict[tuple, float] = collections.defaultdict(float)
    for d in itertools.product(range(vocab), repeat=k):
        drawn = math.prod(float(q[d[:j]][d[j]]) for j in range(k))
        if drawn == 0:
            continue  # the draft never makes these guesses
        target = torch.stack([p[d[:j]] for j in range(k + 1)])
        draft = torch.stack([q[d[:j]] for j in range(k)])
        accept, final = speculative_distributions(target, draft, torch.tensor(d))
        assert accept.shape == (k,) and final.shape == (k + 1, vocab)
        assert bool(((accept >= 0) & (accept <= 1)).all()), f"accept {accept.tolist()} is not a probability"
        reach = drawn  # the probability of drawing d and accepting its first a guesses
        for a in range(k + 1):
            stop = 1 - float(accept[a]) if a < k else 1.0
            for x in range(vocab):
                emitted[d[:a] + (x,)] += reach * stop * float(final[a, x])
            if a < k:
                reach *= float(accept[a])
    return emitted


@pytest.mark.l10_t2
@given(problem=speculation_problems())
def test_speculation_emits_exactly_the_targets_distribution(problem):
    """Complete each emitted sequence to k + 1 tokens with the target's own conditionals: the
    joint must be the target's, ``prod_j p(s_j | s_<j)``, for every sequence ``s``."""
    vocab, k, p, q = problem
    emitted = _emitted(vocab, k, p, q)
    assert math.isclose(sum(emitted.values()), 1.0, abs_tol=1e-9)
    for s in itertools.product(range(vocab), repeat=k + 1):
        target = math.prod(float(p[s[:j]][s[j]]) for j in range(k + 1))
        ours = sum(
            emitted.get(s[:length], 0.0) * math.prod(float(p[s[:j]][s[j]]) for j in range(length, k + 1))
            for length in range(1, k + 2)
        )
        assert ours == pytest.approx(target, abs=1e-9), f"sequence {s}"


@pytest.mark.l10_t2
@given(problem=speculation_problems())
def test_a_draft_equal_to_the_target_is_always_accepted(problem):
    vocab, k, p, _ = problem
    for d in itertools.product(range(vocab), repeat=k):
        if any(float(p[d[:j]][d[j]]) == 0 for j in range(k)):
            continue
        target = torch.stack([p[d[:j]] for j in range(k + 1)])
        accept, final = speculative_distributions(target, target[:k].clone(), torch.tensor(d))
        assert accept.tolist() == [1.0] * k
        assert torch.equal(final[k], target[k]), "the bonus token comes from the target's last row"


@pytest.mark.l10_t2
@given(problem=speculation_problems(), data=st.data())
def test_certain_guesses_are_one_hot_draft_rows(problem, data):
    """``draft_probs=None`` (prompt lookup, a greedy draft) means each guess was certain."""
    vocab, k, p, _ = problem
    d = data.draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k))
    target = torch.stack([p[tuple(d[:j])] for j in range(k + 1)])
    one_hot = torch.nn.functional.one_hot(torch.tensor(d), vocab).to(torch.float64)
    implicit = speculative_distributions(target, None, torch.tensor(d))
    explicit = speculative_distributions(target, one_hot, torch.tensor(d))
    assert torch.equal(implicit[0], explicit[0]) and torch.allclose(implicit[1], explicit[1], atol=1e-12)
    assert implicit[0].tolist() == [float(target[j, d[j]]) for j in range(k)], "accept a certain guess with p(d)"


@pytest.mark.l10_t2
def test_the_rule_by_hand():
    target = torch.tensor([[0.25, 0.75, 0.0], [0.1, 0.2, 0.7]], dtype=torch.float64)
    draft = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    accept, final = speculative_distributions(target, draft, torch.tensor([0]))
    assert accept.tolist() == [0.5], "p/q = 0.25/0.5"
    assert final.tolist() == [[0.0, 1.0, 0.0], [0.1, 0.2, 0.7]], "the residual max(0, p - q), renormalised; then p"
    accept, final = speculative_distributions(target, draft, torch.tensor([1]))
    assert accept.tolist() == [1.0], "p > q: always accepted"
    accept, _ = speculative_distributions(target, draft, torch.tensor([2]))
    assert accept.tolist() == [0.0], "the target never says it: never accepted"
    accept, final = speculative_distributions(target[:1], None, torch.tensor([], dtype=torch.long))
    assert accept.shape == (0,) and final.tolist() == [[0.25, 0.75, 0.0]], "no guesses: one token from p"


# --- the verifier: the rule applied to a step's logits (runs lesson 09's sampler first) --------


def _scheduled(request_id: str, params: SamplingParams, output=(), banned=()) -> ScheduledRequest:
    """A decoding request (prompt [1 2 3]) whose guesses are being checked."""
    return ScheduledRequest(request_id, [3], 4, [0], False, params, list(banned), [1, 2, 3], list(output))


def test_greedy_verification_keeps_the_guesses_that_are_the_argmax():
    argmax = [2, 4, 1, 5]
    logits = torch.full((4, 6), -1.0)
    logits[range(4), argmax] = 3.0
    greedy = SamplingParams(temperature=0, logprobs=1)
    cases = {(2, 4, 1): [2, 4, 1, 5], (2, 4, 0): [2, 4, 1], (2, 3, 1): [2, 4], (0, 4, 1): [2]}
    requests = [_scheduled(f"r{i}", greedy) for i in range(len(cases))]
    proposals = [Proposal(list(guesses)) for guesses in cases]
    results = verify(torch.cat([logits] * len(cases)), requests, proposals, [None] * len(cases), torch.Generator())
    for result, expected in zip(results, cases.values()):
        assert result.token_ids == expected
        assert result.num_draft_tokens == 3 and result.num_accepted == len(expected) - 1
        assert [entry.token_ids[0] for entry in result.logprobs] == expected, "one logprobs entry per emitted token"
    assert results[0].logprobs[3].logprobs[0] == pytest.approx(float(logits[3].log_softmax(-1)[5]))


def test_verification_counts_earlier_guesses_as_output_and_unbans_after_min_tokens():
    """Penalties see the guesses before each position, and min_tokens' ban ends where the
    output would reach it: what plain decoding would have seen, position by position."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5]] * 3)
    penalised = SamplingParams(temperature=0, presence_penalty=1.5)
    results = verify(logits, [_scheduled("p", penalised)], [Proposal([1, 1])], [None], torch.Generator())
    assert results[0].token_ids == [1, 2], "token 1 is penalised once it was guessed before"
    logits = torch.tensor([[0.0, 0.5, 2.0, 0.0]] * 3)
    banned = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2])
    results = verify(logits, [_scheduled("m", banned, output=[1], banned=[0, 2])], [Proposal([1, 1])], [None],
                     torch.Generator())
    assert results[0].token_ids == [1, 1, 2], "the stop token is banned for two more tokens, then wins"


def test_the_first_emitted_token_follows_the_target_monte_carlo():
    """A random request (temperature 1) whose two guesses are drawn from a draft unlike the
    target: over 20k verifications, the first emitted token is distributed as the target's
    first row (each token's count within 4 sigma)."""
    vocab, k, num = 5, 2, 20_000
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(k + 1, vocab, generator=gen, dtype=torch.float32) * 1.5
    draft = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, dim=-1)
    guesses = torch.stack([torch.multinomial(draft[j], num, replacement=True, generator=gen) for j in range(k)], 1)
    params = SamplingParams(temperature=1.0)
    requests = [_scheduled(f"r{i}", params) for i in range(num)]
    proposals = [Proposal(g, draft) for g in guesses.tolist()]
    results = verify(logits.repeat(num, 1), requests, proposals, [None] * num, torch.Generator().manual_seed(5))
    counts = collections.Counter(r.token_ids[0] for r in results)
    expected = torch.softmax(logits[0].double(), -1)
    for token in range(vocab):
        mean, sigma = num * float(expected[token]), math.sqrt(num * float(expected[token] * (1 - expected[token])))
        assert abs(counts[token] - mean) <= 4 * sigma + 1, (token, counts[token], mean)
    accepted = sum(r.num_accepted for r in results)
    assert 0 < accepted < num * k, "some guesses are accepted and some rejected"


# --- L10.T3: giving back rejected guesses' slots -----------------------------------------------


def _hold(manager: KVCacheManager, tables: dict[str, list[int]], num_tokens: dict[str, int],
          lookahead: dict[str, int]) -> None:
    """Hand-made state, as ``allocate_slots(..., num_lookahead_tokens)`` leaves it: each request
    holds its table and ``num_tokens`` slots, the last ``lookahead`` of them for guesses; a
    block's reference count is the number of tables holding it."""
    for request_id, table in tables.items():
        manager.tables[request_id] = list(table)
        manager.num_tokens[request_id] = num_tokens[request_id]
        if lookahead.get(request_id):
            manager.lookahead[request_id] = lookahead[request_id]
    for block, holders in collections.Counter(b for t in tables.values() for b in t).items():
        manager.pool.free_queue.remove(block)
        manager.pool.blocks[block].ref_cnt = holders


def _assert_pool_consistent(manager: KVCacheManager) -> None:
    pool = manager.pool
    held = collections.Counter(b for table in manager.tables.values() for b in table)
    assert [b.ref_cnt for b in pool.blocks] == [held[b.block_id] for b in pool.blocks]
    assert all((b.ref_cnt == 0) == (b.block_id in pool.free_queue) for b in pool.blocks)
    assert pool.num_free_blocks + len(held) == pool.num_blocks
    for request_id, table in manager.tables.items():
        assert len(table) == math.ceil(manager.num_tokens[request_id] / manager.block_size)


@pytest.mark.l10_t3
@given(block_size=st.integers(1, 4), num_verified=st.integers(1, 12), lookahead=st.integers(1, 6),
       num_shared=st.integers(0, 2), data=st.data())
def test_truncate_keeps_the_verified_slots_and_frees_exactly_the_tail(block_size, num_verified, lookahead,
                                                                      num_shared, data):
    """A request holds slots for its verified tokens and ``lookahead`` guesses, in blocks
    scattered over the pool, its first ones shared with another request; ``accepted`` of the
    guesses turn out right. Its table keeps ``ceil(kept / block_size)`` blocks, the others go
    back to the pool, and nobody else's block is touched."""
    accepted = data.draw(st.integers(0, lookahead))
    have = num_verified + lookahead
    num_blocks = math.ceil(have / block_size)
    num_shared = min(num_shared, num_verified // block_size)  # only full blocks of verified tokens are shared
    pool_size = num_blocks + 5
    table = data.draw(st.permutations(range(pool_size)))[:num_blocks]
    manager = KVCacheManager(pool_size, block_size)
    other = {"other": table[:num_shared]} if num_shared else {}
    _hold(manager, {"spec": table, **other}, {"spec": have, "other": num_shared * block_size}, {"spec": lookahead})
    free_before = manager.num_free_blocks
    tokens = list(range(100, 100 + num_verified + accepted))
    manager.truncate("spec", tokens)
    keep = math.ceil(len(tokens) / block_size)
    assert manager.block_table("spec") == table[:keep]
    assert manager.num_tokens["spec"] == len(tokens)
    released = table[keep:]
    assert manager.num_free_blocks == free_before + len(released)
    assert all(b in manager.pool.free_queue and manager.pool.blocks[b].ref_cnt == 0 for b in released)
    assert all(manager.pool.blocks[b].ref_cnt == 2 for b in table[:num_shared]), "shared blocks stay shared"
    _assert_pool_consistent(manager)
    with pytest.raises(ValueError, match="spec"):
        manager.truncate("spec", tokens + [7])  # more than it holds now
    assert manager.block_table("spec") == table[:keep] and manager.num_free_blocks == free_before + len(released)
    _assert_pool_consistent(manager)


@pytest.mark.l10_t3
def test_truncate_by_hand_and_the_trace_of_what_it_gave_back():
    """Block size 4. ``a``: 6 verified tokens and 6 guesses hold three blocks; keeping 2 of the
    guesses (8 tokens) gives back the third, which held nothing but guesses. ``b``: 5 and 3,
    none right: its partly filled second block stays. ``c``: 4 and 4, none right: its table
    ends at the block boundary."""
    trace = Trace(8, 4)
    manager = KVCacheManager(8, 4, trace)
    _hold(manager, {"a": [5, 2, 7], "b": [0, 6], "c": [3, 1]}, {"a": 12, "b": 8, "c": 8}, {"a": 6, "b": 3, "c": 4})
    manager.truncate("a", list(range(8)))
    assert manager.block_table("a") == [5, 2]
    assert manager.pool.blocks[7].ref_cnt == 0 and 7 in manager.pool.free_queue
    event = trace.events[-1]
    assert (event.kind, event.request_id, event.block_ids) == ("truncate", "a", (7,))
    assert (event.token_ids, event.first_position) == ((6, 7), 6), "the accepted guesses and where they go"
    with pytest.raises(ValueError, match="not 9"):
        manager.truncate("a", list(range(9)))
    with pytest.raises(ValueError, match="5 verified tokens.*not 4"):
        manager.truncate("b", list(range(4)))  # below its verified tokens: a cached block could be cut
    manager.truncate("b", list(range(5)))
    assert manager.block_table("b") == [0, 6], "a partly filled block of verified tokens stays"
    manager.truncate("c", list(range(4)))
    assert manager.block_table("c") == [3] and manager.num_free_blocks == 8 - 5
    _assert_pool_consistent(manager)


def test_guessed_tokens_are_never_cached():
    """With prefix caching, a block written only with guesses is never registered, not even
    once truncation gives it back; accepted guesses are cached only once verified blocks of
    them are appended like any token."""
    manager = KVCacheManager(8, 4, enable_prefix_caching=True)
    verified = [11, 12, 13, 14, 15, 16]
    assert manager.allocate_slots("a", verified, num_lookahead_tokens=6)  # slots 0..11: three blocks
    first, partly_guessed, only_guessed = manager.block_table("a")
    assert list(manager.pool.cached.values()) == [first], "only the full block of verified tokens"
    guesses = [17, 18, 19, 20, 21, 22]
    assert manager.get_computed_blocks(verified + guesses + [1]) == [first], "no hit on a guessed block"
    manager.truncate("a", verified + guesses[:1])  # one guess accepted: 7 tokens, two blocks
    assert manager.block_table("a") == [first, partly_guessed]
    assert manager.pool.blocks[only_guessed].block_hash is None and only_guessed in manager.pool.free_queue
    assert list(manager.pool.cached.values()) == [first]
    assert manager.allocate_slots("a", verified + guesses[:1] + [30, 31], num_lookahead_tokens=2)  # fills block 2
    assert list(manager.pool.cached.values()) == [first, partly_guessed], "a full block of verified tokens"
    assert manager.get_computed_blocks(verified + [17, 30, 99]) == [first, partly_guessed]
    manager.truncate("a", verified + [17, 30, 31])
    manager.free("a")
    assert manager.num_free_blocks == 8


def test_the_trace_replays_accepted_guesses_into_their_blocks():
    trace = Trace(6, 3)
    manager = KVCacheManager(6, 3, trace)
    assert manager.allocate_slots("a", [1, 2, 3, 4], num_lookahead_tokens=4)  # 8 slots: three blocks
    assert manager.allocate_slots("b", [9], num_lookahead_tokens=2)
    table = list(manager.block_table("a"))
    manager.truncate("a", [1, 2, 3, 4, 5, 6])  # two guesses accepted
    manager.truncate("b", [9])  # none
    last = replay(trace)[-1]
    assert last.tables == manager.tables == {"a": table[:2], "b": manager.block_table("b")}
    assert [last.tokens[b] for b in table] == [[1, 2, 3], [4, 5, 6], []]
    assert last.owner[table[2]] is None and last.ref_cnt[table[2]] == 0
    assert last.tokens[manager.block_table("b")[0]] == [9]
    assert last.ref_cnt == [b.ref_cnt for b in manager.pool.blocks]


class SpeculatingPoolMachine(SharingMachine):
    """Lesson 08's sharing machine (requests arrive with prefix hits, grow, fork and finish in
    any order), with prefix caching on or off, and two more rules: a request *guesses* (it
    allocates lookahead slots, and the "worker" writes guesses into them) and then learns how
    many guesses were right (truncate). Between the two it neither grows nor forks, as in the
    engine. The pool's invariants hold after every step, no cached block ever holds a wrong
    guess, and the trace replays to the real state with the verified tokens in their blocks."""

    requests = SharingMachine.requests

    def __init__(self) -> None:
        super().__init__()
        self.guesses: dict[str, list[int]] = {}  # a request between allocation and truncation

    @precondition(lambda self: self.manager is None)
    @rule(num_blocks=st.integers(2, 20), block_size=st.sampled_from([1, 2, 3, 4]), caching=st.booleans())
    def start(self, num_blocks, block_size, caching):
        self.manager = KVCacheManager(num_blocks, block_size, Trace(num_blocks, block_size), caching)

    def _settled(self, request_id: str) -> bool:
        return super()._settled(request_id) and request_id not in self.guesses

    def _held(self, request_id: str) -> int:
        return super()._held(request_id) + len(self.guesses.get(request_id, ()))

    def _write(self, request_id: str, start: int) -> None:
        """The worker writes the verified tokens from ``start`` and then the guesses."""
        verified = self.tokens[request_id]
        self.tokens[request_id] = verified + self.guesses.get(request_id, [])
        try:
            super()._write(request_id, start)
        finally:
            self.tokens[request_id] = verified

    @rule(request_id=requests, new=st.integers(0, 2), lookahead=st.integers(0, 5),
          wrong=st.lists(st.booleans(), min_size=5, max_size=5))
    def guess(self, request_id, new, lookahead, wrong):
        """Append ``new`` verified tokens (the last step's) and hold ``lookahead`` slots for
        guesses; a guess is the token the next verified prefix has, or a wrong one (55)."""
        if not self._settled(request_id):
            return
        start = len(self.tokens[request_id])
        verified = self.tokens[request_id] + [7] * new
        guesses = [55 if w else 100 + len(verified) + j for j, w in enumerate(wrong[:lookahead])]
        if self.manager.allocate_slots(request_id, verified, num_lookahead_tokens=lookahead):
            self.tokens[request_id] = verified
            self.guesses[request_id] = guesses
            self._write(request_id, start)

    @rule(request_id=requests, data=st.data())
    def verify(self, request_id, data):
        """Some guesses were accepted, never a wrong one: keep their slots, give back the rest."""
        if request_id not in self.guesses or request_id not in self.tokens:
            return
        guesses = self.guesses.pop(request_id)
        accepted = data.draw(st.integers(0, (guesses + [55]).index(55)))
        self.tokens[request_id] += guesses[:accepted]
        self.manager.truncate(request_id, self.tokens[request_id])

    @invariant()
    def no_cached_block_holds_a_wrong_guess(self):
        if self.manager is None:
            return
        for block in self.manager.pool.cached.values():
            assert 55 not in self.content[block], f"block {block} caches a wrong guess"

    @invariant()
    def replayed_blocks_hold_the_verified_tokens(self):
        if self.manager is None:
            return
        last = replay(self.manager.trace)[-1]
        for request_id, tokens in self.tokens.items():
            stored = [t for b in self.manager.block_table(request_id) for t in last.tokens[b]]
            assert stored == tokens

TestSpeculatingPool = SpeculatingPoolMachine.TestCase


# --- the scheduler's lookahead slots (runs lesson 06's scheduler first) --------------------------


def _request(request_id: str, prompt_len: int, max_tokens: int | None) -> Request:
    return Request(request_id, None, [3] * prompt_len, SamplingParams(max_tokens=max_tokens), frozenset({0}), 0.0)


def _step(scheduler: Scheduler, num_accepted: dict[str, int] | None = None):
    """One engine step without a model: a guessing request gets its first
    ``num_accepted[id]`` guesses (default all) and then token 8; a sampling one token 7."""
    plan = scheduler.schedule()
    sampled = {}
    for s in plan.scheduled:
        if s.num_lookahead_tokens:
            accepted = min(s.num_lookahead_tokens, (num_accepted or {}).get(s.request_id, s.num_lookahead_tokens))
            sampled[s.request_id] = [9] * accepted + [8]
        elif s.sample:
            sampled[s.request_id] = [7]
    scheduler.update_after_step(plan, sampled)
    for request_id, tokens in sampled.items():
        request = scheduler.requests[request_id]
        for token in tokens:
            request.output_token_ids.append(token)
            if len(request.output_token_ids) == request.params.max_tokens:
                request.status = RequestStatus.FINISHED_LENGTH
                scheduler.finish_request(request_id)
                break
    return plan


def test_only_decoding_requests_get_lookahead_and_never_past_their_length_limit():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(kv, token_budget=64, max_num_seqs=4, num_speculative_tokens=4, max_model_len=32)
    scheduler.add_request(_request("short", 3, max_tokens=3))
    scheduler.add_request(_request("long", 25, max_tokens=None))  # limited by max_model_len = 32
    plan = _step(scheduler)
    assert [s.num_lookahead_tokens for s in plan.scheduled] == [0, 0], "a prefill step guesses nothing"
    plan = _step(scheduler)
    # short: 4 tokens, may grow to 6, so one guess (a guess and a bonus token: 2 new tokens)
    assert {s.request_id: s.num_lookahead_tokens for s in plan.scheduled} == {"short": 1, "long": 4}
    assert all(len(s.block_table) * 4 >= s.num_computed_tokens + 1 + s.num_lookahead_tokens for s in plan.scheduled)
    assert "short" not in scheduler.requests, "3 tokens: 1, then a guess and a bonus"
    long = scheduler.requests["long"]
    assert (long.num_tokens, long.num_computed_tokens) == (31, 30), "26 + 4 accepted + 1"
    assert len(kv.block_table("long")) == math.ceil(30 / 4), "the slots past the verified tokens are given back"
    plan = _step(scheduler)
    assert plan.scheduled[0].num_lookahead_tokens == 0, "31 tokens of 32: no room for a guess"
    scheduler.finish_request("long")
    assert kv.num_free_blocks == 64


def _decoding(names: str, k: int, budget: int = 64, num_blocks: int = 64, **kwargs) -> tuple[KVCacheManager, Scheduler]:
    """A scheduler guessing up to ``k`` tokens whose requests ``names`` (3-token prompts, at most
    20 new tokens, block size 4) have computed their prompts and sampled one token."""
    kv = KVCacheManager(num_blocks=num_blocks, block_size=4)
    scheduler = Scheduler(kv, token_budget=budget, max_num_seqs=4, num_speculative_tokens=k, max_model_len=64,
                          **kwargs)
    for name in names:
        scheduler.add_request(_request(name, 3, max_tokens=20))
    _step(scheduler)
    return kv, scheduler


def test_lookahead_comes_out_of_the_leftover_budget():
    kv, scheduler = _decoding("abc", k=4, budget=10)
    plan = _step(scheduler, {"a": 0, "b": 0, "c": 0})  # 3 decode tokens: 7 of the budget left, oldest first
    assert [s.num_lookahead_tokens for s in plan.scheduled] == [4, 3, 0]
    assert plan.num_batched_tokens + sum(s.num_lookahead_tokens for s in plan.scheduled) <= 10
    assert [len(kv.block_table(r)) for r in "abc"] == [1, 1, 1], "rejected guesses' blocks were given back"
    assert [scheduler.requests[r].num_computed_tokens for r in "abc"] == [4, 4, 4]
    assert kv.num_free_blocks == 64 - 3


def test_guesses_come_before_new_prompts_but_after_real_tokens():
    """A decoding request keeps its guesses while a long prompt arrives (vLLM's order: running
    requests, their guesses, then admissions); the prompt takes what is left, chunked."""
    _, scheduler = _decoding("a", k=4, budget=8)
    scheduler.add_request(_request("long", 30, max_tokens=5))
    plan = _step(scheduler, {"a": 0})
    assert [(s.request_id, len(s.token_ids), s.num_lookahead_tokens) for s in plan.scheduled] == [
        ("a", 1, 4), ("long", 3, 0)]


def test_nobody_guesses_once_the_batch_reaches_disable_by_batch_size():
    _, scheduler = _decoding("a", k=2, speculation_max_batch=2)
    assert [s.num_lookahead_tokens for s in _step(scheduler, {"a": 0}).scheduled] == [2], "one running: guesses"
    scheduler.add_request(_request("b", 3, max_tokens=20))
    _step(scheduler, {"a": 0})
    assert [s.num_lookahead_tokens for s in _step(scheduler, {"a": 0}).scheduled] == [0, 0], "two running: none"


def test_a_guess_never_preempts():
    """Short of free blocks, a request simply does not guess this step."""
    kv, scheduler = _decoding("ab", k=8, num_blocks=4)
    plan = _step(scheduler)  # a's 8 guesses take the two free blocks; none is left for b's
    assert [s.num_lookahead_tokens for s in plan.scheduled] == [8, 0]
    assert not plan.preempted_request_ids and scheduler.num_preemptions == 0
    assert len(kv.block_table("a")) == 3 and scheduler.requests["a"].num_computed_tokens == 12
    assert scheduler.requests["b"].num_tokens == 5


def test_a_speculating_scheduler_needs_max_model_len():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(KVCacheManager(4, 4), 16, 2, num_speculative_tokens=2)


# --- the counters ------------------------------------------------------------------------------


def test_spec_decode_stats_count_drafts_guesses_and_acceptances():
    stats = SpecDecodeStats()
    assert (stats.acceptance_rate, stats.mean_acceptance_length) == (0.0, 1.0)
    for step, (guesses, accepted) in enumerate([(4, 4), (4, 0), (2, 1)]):
        stats.observe(step, guesses, accepted)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 10, 5)
    assert stats.acceptance_rate == 0.5 and stats.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert list(stats.history) == [(0, 4, 4), (1, 4, 0), (2, 2, 1)]


@settings(max_examples=20)
@given(guesses=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5)), max_size=10))
def test_spec_decode_stats_are_consistent(guesses):
    stats = SpecDecodeStats()
    for step, (k, a) in enumerate(guesses):
        stats.observe(step, k, min(a, k))
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert 0 <= stats.acceptance_rate <= 1
    if stats.num_drafts:
        assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
