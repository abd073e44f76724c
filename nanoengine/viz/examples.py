"""Small, fixed stories for the figures: no model, no random source, the same result every time.

Lesson 03's paging story: three requests are admitted into a 32-block pool of 4-token
blocks and decode in lock-step, so their blocks interleave; one finishes and leaves holes;
a fourth arrives and takes blocks further along the free queue. Token ids encode the
request (A's are 101, 102, ...; B's 201, ...) so a picture shows whose token sits in which
slot. Lessons 06-07 and 14 drive the real scheduler, lesson 08 the prefix cache, and lesson 09
hand-writes logits and a bigram table for the sampling and beam-search pictures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.trace import Trace

if TYPE_CHECKING:
    import torch

    from nanoengine.lora.request import LoRARequest
    from nanoengine.request import Request
    from nanoengine.sampling.beam_search import BeamSearchOutput
    from nanoengine.scheduler import Scheduler

NUM_BLOCKS, BLOCK_SIZE = 32, 4


def example_paging_manager() -> KVCacheManager:
    """The manager at the end of the story; its ``trace`` holds every step (7 snapshots).

    Ends with A, C and D live (13, 9 and 11 tokens: each has a partly filled last block)
    and B's four blocks free in the middle of the used ones.
    """
    manager = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, trace=Trace(NUM_BLOCKS, BLOCK_SIZE))
    sequences: dict[str, list[int]] = {}

    def admit(request_id: str, first_token: int, prompt_len: int) -> None:
        sequences[request_id] = list(range(first_token, first_token + prompt_len))
        assert manager.allocate_slots(request_id, sequences[request_id])

    def decode(*request_ids: str) -> None:
        for request_id in request_ids:
            sequences[request_id].append(sequences[request_id][-1] + 1)
            assert manager.allocate_slots(request_id, sequences[request_id])

    admit("A", 101, 7)
    admit("B", 201, 10)
    admit("C", 301, 3)
    for _ in range(3):
        manager.trace.next_step()
        decode("A", "B", "C")
    manager.trace.next_step()
    manager.free("B")
    admit("D", 401, 9)
    decode("A", "C")
    for _ in range(2):
        manager.trace.next_step()
        decode("A", "C", "D")
    return manager


def example_paging_trace() -> Trace:
    """The trace of :func:`example_paging_manager`, for figures and notebooks."""
    return example_paging_manager().trace


# Lessons 06-07: (request id, arrival step, prompt length, output length). C's prompt is longer
# than a step's budget, so it is prefilled in chunks; the pool is too small for everyone's
# growth, so the newest running request is preempted once and recomputed later.
SCHEDULER_REQUESTS = (("A", 0, 5, 9), ("B", 0, 3, 4), ("C", 1, 18, 5), ("D", 4, 4, 6), ("E", 6, 6, 3))
SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE, SCHEDULER_TOKEN_BUDGET, SCHEDULER_MAX_NUM_SEQS = 9, 4, 8, 4
_SAMPLED_TOKEN = 7  # what the pretend model always samples


def example_scheduler_trace() -> tuple[Trace, int]:
    """A real :class:`~nanoengine.scheduler.Scheduler` over a real ``KVCacheManager``, driven the
    way ``LLMEngine.step`` drives it, with a pretend model that always samples the same token.

    Returns the trace and the step's token budget. No model, no torch, the same trace every time.
    """
    from nanoengine.scheduler import Scheduler

    trace = Trace(SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE)
    scheduler = Scheduler(KVCacheManager(SCHEDULER_NUM_BLOCKS, SCHEDULER_BLOCK_SIZE, trace),
                          SCHEDULER_TOKEN_BUDGET, SCHEDULER_MAX_NUM_SEQS, trace=trace)
    first_token = {rid: 100 * (i + 1) + 1 for i, (rid, *_) in enumerate(SCHEDULER_REQUESTS)}
    _drive(scheduler, [_request(rid, step, first_token[rid], prompt_len, output_len)
                       for rid, step, prompt_len, output_len in SCHEDULER_REQUESTS])
    return trace, SCHEDULER_TOKEN_BUDGET


def _request(request_id: str, step: int, first_token: int, prompt_len: int, output_len: int,
             lora_request: LoRARequest | None = None) -> Request:
    """A request arriving at ``step`` whose prompt counts up from ``first_token``."""
    from nanoengine.request import Request
    from nanoengine.sampling_params import SamplingParams

    return Request(request_id, None, list(range(first_token, first_token + prompt_len)),
                   SamplingParams(max_tokens=output_len, ignore_eos=True), frozenset(), float(step),
                   lora_request=lora_request)


def _drive(scheduler: Scheduler, requests: list[Request]) -> None:
    """Add each request at the step of its ``arrival_time`` and step the scheduler until all
    have finished, as ``LLMEngine.step`` would with a model that always samples the same token."""
    from nanoengine.scheduler.simulate import simulate_step

    pending = sorted(requests, key=lambda r: r.arrival_time)
    step = 0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[0].arrival_time <= step:
            scheduler.add_request(pending.pop(0))
        simulate_step(scheduler, _SAMPLED_TOKEN)
        step += 1
        if step > 200:
            raise RuntimeError("the example scheduler stopped making progress")


# Lesson 14: (request id, arrival step, prompt length, output length, adapter or None for the base
# model). Eight requests over three adapters and the base model, with two adapter slots: lora-3's
# first request must wait until lora-1's requests are done, while base-model requests and those
# of adapters already running go ahead.
LORA_REQUESTS = (("r0", 0, 6, 4, "lora-1"), ("r1", 0, 5, 9, "lora-2"), ("r2", 0, 4, 5, "lora-3"),
                 ("r3", 0, 6, 6, None), ("r4", 1, 5, 3, "lora-1"), ("r5", 2, 4, 6, "lora-3"),
                 ("r6", 3, 5, 5, None), ("r7", 4, 6, 4, "lora-2"))
LORA_NUM_BLOCKS, LORA_BLOCK_SIZE, LORA_TOKEN_BUDGET, LORA_MAX_NUM_SEQS, LORA_MAX_LORAS = 32, 4, 16, 6, 2


def example_lora_trace() -> tuple[Trace, dict[str, str | None], int]:
    """:data:`LORA_REQUESTS` through a real :class:`~nanoengine.scheduler.Scheduler` with
    ``max_loras`` slots, driven as in :func:`example_scheduler_trace` (no adapter is read:
    the scheduler only needs their ids).

    Returns the trace, each request's adapter name (None: the base model) and ``max_loras``.
    """
    from nanoengine.lora.request import LoRARequest
    from nanoengine.scheduler import Scheduler

    trace = Trace(LORA_NUM_BLOCKS, LORA_BLOCK_SIZE)
    scheduler = Scheduler(KVCacheManager(LORA_NUM_BLOCKS, LORA_BLOCK_SIZE, trace), LORA_TOKEN_BUDGET,
                          LORA_MAX_NUM_SEQS, trace=trace, max_loras=LORA_MAX_LORAS)
    names = sorted({name for *_, name in LORA_REQUESTS if name})
    loras = {name: LoRARequest(name, i, f"/adapters/{name}") for i, name in enumerate(names, 1)}
    _drive(scheduler, [_request(rid, step, 100 * (i + 1) + 1, prompt_len, output_len, loras.get(name))
                       for i, (rid, step, prompt_len, output_len, name) in enumerate(LORA_REQUESTS)])
    return trace, {rid: name for rid, *_, name in LORA_REQUESTS}, LORA_MAX_LORAS


# Lesson 08: prefix caching. A pool of 10 blocks of 4 tokens; the system prompt is tokens 1..8
# (two full blocks); each request's own tokens encode it (A's 101, 102, ...; B's 201, ...).
PREFIX_NUM_BLOCKS, PREFIX_BLOCK_SIZE = 10, 4
SYSTEM_PROMPT = tuple(range(1, 9))


def example_prefix_manager() -> KVCacheManager:
    """The prefix-caching story, on a real ``KVCacheManager`` with prefix caching on.

    Step 0: A (system prompt + its question) computes everything and registers its full
    blocks. Steps 1-2: B and C share the system prompt and take its two blocks from the
    cache. Step 3: A and B finish; their cached blocks stay in the free queue, tail first.
    Step 4: D, with a prompt of its own, needs five blocks: the least recently freed cached
    ones are evicted, A's question last block first; C finishes. Step 5: E asks B's
    question again: the system prompt and B's first question block come back from the
    cache though nobody held them; B's last block was evicted to make room for E.
    """
    manager = KVCacheManager(PREFIX_NUM_BLOCKS, PREFIX_BLOCK_SIZE, trace=Trace(PREFIX_NUM_BLOCKS, PREFIX_BLOCK_SIZE),
                             enable_prefix_caching=True)
    sequences: dict[str, list[int]] = {}

    def admit(request_id: str, prompt: list[int]) -> list[int]:
        sequences[request_id] = prompt
        hit = manager.get_computed_blocks(prompt)
        assert manager.allocate_slots(request_id, prompt, hit)
        return hit

    def decode(*request_ids: str) -> None:
        for request_id in request_ids:
            sequences[request_id].append(sequences[request_id][-1] + 1)
            assert manager.allocate_slots(request_id, sequences[request_id])

    def question(first_token: int, length: int) -> list[int]:
        return [*SYSTEM_PROMPT, *range(first_token, first_token + length)]

    assert admit("A", question(101, 6)) == []
    manager.trace.next_step()
    decode("A")
    assert admit("B", question(201, 6)) == [0, 1]
    manager.trace.next_step()
    decode("A", "B")
    assert admit("C", question(301, 2)) == [0, 1]
    manager.trace.next_step()
    decode("A", "B", "C")
    manager.free("A")
    manager.free("B")
    manager.trace.next_step()
    decode("C")
    assert admit("D", list(range(401, 419))) == []
    manager.free("C")
    manager.trace.next_step()
    decode("D")
    assert admit("E", question(201, 6)) == [0, 1, 4]
    evicted = [e.block_ids[0] for e in manager.trace.events if e.kind == "evict"]
    assert evicted == [3, 2, 5], evicted  # A's question tail first, then B's last block
    return manager


def example_prefix_trace() -> Trace:
    """The trace of :func:`example_prefix_manager`, for the prefix-tree figure and notebooks."""
    return example_prefix_manager().trace


# Lesson 09: a 12-word vocabulary and its next-token logits after "The cat sat on the", written by
# hand (no model); some are negative so that the repetition penalty's two rules both show.
EXAMPLE_VOCAB = ("mat", "sofa", "floor", "bed", "chair", "rug", "table", "roof", "grass", "car", "moon", "idea")
EXAMPLE_LOGITS = (3.0, 2.5, 2.1, 1.7, 1.3, 0.9, 0.4, -0.2, -0.6, -1.2, -1.8, -2.5)


def example_logits() -> torch.Tensor:
    """:data:`EXAMPLE_LOGITS` as a 1-D float32 tensor (one logit per word of :data:`EXAMPLE_VOCAB`)."""
    import torch

    return torch.tensor(EXAMPLE_LOGITS, dtype=torch.float32)


# Lesson 09: beam search over a toy bigram "model" whose next-token log-probabilities depend on
# the last word only, written by hand. The prompt is "The cat".
BEAM_VOCAB = {1: "The", 2: "cat", 3: "sat", 4: "is", 5: "was", 6: "ran", 7: "on", 8: "down", 9: "in", 10: "the",
              11: "a", 12: "mat", 13: "sofa", 14: "box", 15: "asleep", 16: "here", 17: "still", 18: "my", 19: "bed"}
BEAM_PROMPT = (1, 2)
BEAM_WIDTH, BEAM_STEPS = 3, 4
_BIGRAM = {  # last word -> its four proposals, most likely first
    "cat": {"sat": -0.5, "is": -1.2, "was": -1.7, "ran": -2.6},
    "sat": {"on": -0.4, "down": -1.5, "in": -2.3, "still": -3.0},
    "is": {"asleep": -0.5, "on": -1.1, "in": -1.9, "here": -2.4},
    "was": {"asleep": -0.8, "on": -1.4, "here": -2.0, "in": -2.5},
    "on": {"the": -0.3, "a": -1.6, "my": -2.1, "here": -3.0},
    "down": {"on": -0.7, "here": -1.6, "in": -2.2, "still": -2.9},
    "in": {"the": -0.4, "a": -1.3, "my": -2.0, "bed": -2.6},
    "asleep": {"on": -0.3, "in": -1.3, "here": -1.9, "still": -2.8},
    "the": {"mat": -0.6, "sofa": -1.0, "box": -1.7, "bed": -2.2},
    "a": {"box": -0.9, "mat": -1.2, "sofa": -1.8, "bed": -2.5},
    "my": {"bed": -0.5, "sofa": -1.4, "mat": -2.0, "box": -2.7},
    "here": {"still": -0.9, "on": -1.6, "in": -2.1, "asleep": -2.9},
    "still": {"on": -0.8, "here": -1.5, "asleep": -2.0, "in": -2.9},
}


def example_beam_output() -> BeamSearchOutput:
    """A ``BeamSearchOutput`` of 3 beams after 4 steps, searched by the real ``expand_beams``.

    Each live beam proposes its four most likely next words (the engine asks for
    ``2 * beam_width`` = 6; four keep the picture readable), with ``decoded_token`` set.
    The best beams are "sat on the mat", "sat on the sofa" and "is asleep on the": the first
    two share three tokens, and "was" is pruned after one step.
    """
    from nanoengine.outputs import Logprob
    from nanoengine.sampling.beam_search import BeamSearchOutput, BeamSearchSequence, best_beams, expand_beams

    ids = {word: token for token, word in BEAM_VOCAB.items()}

    def proposals(beam: BeamSearchSequence) -> dict[int, Logprob]:
        words = _BIGRAM[BEAM_VOCAB[beam.tokens[-1]]]
        return {ids[w]: Logprob(lp, rank, w) for rank, (w, lp) in enumerate(words.items(), 1)}

    beams = [BeamSearchSequence(list(BEAM_PROMPT))]
    for _ in range(BEAM_STEPS):
        beams, finished = expand_beams(beams, [proposals(b) for b in beams], BEAM_WIDTH, eos_token_ids=())
        assert not finished
    output = BeamSearchOutput(best_beams(beams, BEAM_WIDTH, (), 1.0))
    texts = [" ".join(BEAM_VOCAB[t] for t in s.tokens[len(BEAM_PROMPT):]) for s in output.sequences]
    assert texts == ["sat on the mat", "sat on the sofa", "is asleep on the"], texts
    for sequence, text in zip(output.sequences, texts):
        sequence.text, sequence.finish_reason = " " + text, "length"
    return output


# Lesson 16: one request (a 20-token prompt, prefilled in 8-token chunks, then 60 new tokens) in
# blocks of 4, run twice: with full attention, and with every layer sliding over 8 tokens.
SLIDING_PROMPT_LEN, SLIDING_OUTPUT_LEN, SLIDING_WINDOW = 20, 60, 8
SLIDING_NUM_BLOCKS, SLIDING_BLOCK_SIZE, SLIDING_TOKEN_BUDGET = 32, 4, 8


def example_sliding_traces() -> tuple[dict[str, tuple[Trace, int | None]], str]:
    """The request through a real :class:`~nanoengine.scheduler.Scheduler` over a real
    ``KVCacheManager``, driven as in :func:`example_scheduler_trace`, once without and once with
    the manager's ``sliding_window``. The blocks a request holds depend only on how many tokens
    it has, not on which, so a real model gives the same counts (``tests/test_l16_viz.py``).

    Returns each run's trace and window (None: full attention), by label, and the request's id.
    """
    from nanoengine.scheduler import Scheduler

    runs: dict[str, tuple[Trace, int | None]] = {}
    for label, window in (("full attention", None), (f"every layer sliding, window {SLIDING_WINDOW}", SLIDING_WINDOW)):
        trace = Trace(SLIDING_NUM_BLOCKS, SLIDING_BLOCK_SIZE)
        manager = KVCacheManager(SLIDING_NUM_BLOCKS, SLIDING_BLOCK_SIZE, trace, sliding_window=window)
        _drive(Scheduler(manager, SLIDING_TOKEN_BUDGET, 1, trace=trace),
               [_request("A", 0, 101, SLIDING_PROMPT_LEN, SLIDING_OUTPUT_LEN)])
        runs[label] = (trace, window)
    return runs, "A"
