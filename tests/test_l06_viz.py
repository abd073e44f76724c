"""Lessons 06–07's pictures: the scheduler Gantt chart reads the trace faithfully, builds
headless and deterministically, and the benchmark figures draw the recorded schema."""

from __future__ import annotations

import matplotlib
import pytest
from hypothesis import given
from hypothesis import strategies as st

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from nanoengine.cache.kv_cache_manager import KVCacheManager  # noqa: E402
from nanoengine.request import Request  # noqa: E402
from nanoengine.sampling_params import SamplingParams  # noqa: E402
from nanoengine.scheduler import Scheduler  # noqa: E402
from nanoengine.scheduler.simulate import simulate_step  # noqa: E402
from nanoengine.trace import Trace  # noqa: E402
from nanoengine.viz import example_scheduler_trace, gantt_states, save_figure, scheduler_gantt  # noqa: E402
from nanoengine.viz.bench_plots import batching_throughput, chunk_size_tradeoff  # noqa: E402
from nanoengine.viz.gantt import (  # noqa: E402
    COMPUTING,
    DECODE,
    PREEMPTED,
    PREFILL,
    RECOMPUTE,
    STALLED,
    WAITING,
)

pytestmark = pytest.mark.l06


def _result(mode: str, budget: int, scale: float) -> dict:
    """The schema of ``nanoengine bench throughput --result-json``, with made-up numbers."""
    def stat(median: float) -> dict:
        return {"median": median, "min": 0.9 * median, "max": 1.1 * median}

    return {
        "command": "nanoengine bench throughput", "date": "2026-01-01", "machine": "test machine", "model": "m",
        "dtype": "bfloat16", "mode": mode, "num_prompts": 16, "input_len": 64, "output_len": 32, "range_ratio": 0.5,
        "max_num_seqs": 8, "token_budget": budget, "preemptions": 0,
        "elapsed_s": stat(10 / scale), "requests_per_s": stat(1.6 * scale), "total_tokens_per_s": stat(150 * scale),
        "output_tokens_per_s": stat(50 * scale), "ttft_p50_s": stat(2 / scale), "tpot_p50_ms": stat(80 * scale),
    }


def _drive(scheduler: Scheduler, arrivals: list[tuple[int, str, int, int]]) -> None:
    """As ``LLMEngine.step``, with a pretend model that samples token 7."""
    pending, step = sorted(arrivals), 0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt_len, max_tokens = pending.pop(0)
            scheduler.add_request(Request(request_id, None, [3] * prompt_len, SamplingParams(max_tokens=max_tokens),
                                          frozenset(), float(step)))
        simulate_step(scheduler)
        step += 1
        assert step < 2000


@pytest.fixture(scope="module")
def example():
    return example_scheduler_trace()


def test_example_preempts_once_and_chunks_a_long_prompt(example):
    trace, budget = example
    data = gantt_states(trace)
    assert data.num_preemptions == 1
    flat = [s for row in data.states for s in row]
    assert flat.count(PREEMPTED) == 1 and RECOMPUTE in flat and WAITING in flat
    chunked = [i for i, row in enumerate(data.states) if row.count(PREFILL) > 1]
    assert chunked, "no prompt was split into chunks"
    for i in chunked:
        assert sum(c for c, s in zip(data.chunk_sizes[i], data.states[i]) if s == PREFILL) == data.prompt_lens[i]
    assert any(data.prompt_lens[i] > budget for i in chunked), "no prompt longer than the budget"


def test_token_counts_match_the_trace_and_respect_the_budget(example):
    trace, budget = example
    data = gantt_states(trace)
    expected = [0] * data.num_steps
    for e in trace.events:
        if e.kind == "schedule":
            expected[e.step] += len(e.token_ids)
    assert data.total_tokens_per_step() == expected
    assert max(expected) <= budget
    assert data.num_steps == trace.step


def test_event_semantics_on_a_hand_made_trace():
    """arrive/schedule/preempt at step s name column s; finish at s + 1 means gone from s + 1."""
    trace = Trace(num_blocks=4, block_size=2)
    trace.record("arrive", "A", token_ids=range(3))
    trace.record("arrive", "B", token_ids=range(2))
    trace.record("schedule", "A", token_ids=range(3))
    trace.next_step()  # step 0 ran: A prefilled, B waited
    trace.record("schedule", "A", token_ids=[9], first_position=3)
    trace.record("schedule", "B", token_ids=range(2))
    trace.next_step()  # step 1: A decodes, B prefills
    trace.record("preempt", "B")
    trace.record("schedule", "A", token_ids=[9], first_position=4)
    trace.next_step()  # step 2: B preempted
    trace.record("finish", "A")  # A finished at the end of step 2
    trace.record("schedule", "B", token_ids=range(3))
    trace.next_step()  # step 3: B recomputes its prompt and its first token
    trace.record("schedule", "B", token_ids=[9], first_position=3)
    trace.next_step()
    trace.record("finish", "B")
    data = gantt_states(trace)
    assert data.request_ids == ["A", "B"]
    assert data.states[0] == [PREFILL, DECODE, DECODE, None, None]
    assert data.states[1] == [WAITING, PREFILL, PREEMPTED, RECOMPUTE, DECODE]
    assert data.finished_at == [3, 5]
    assert data.chunk_sizes[1] == [0, 2, 0, 3, 1]
    assert data.tokens_per_step == {PREFILL: [3, 2, 0, 0, 0], RECOMPUTE: [0, 0, 0, 3, 0], DECODE: [0, 1, 1, 0, 1]}


def test_a_running_request_without_budget_is_stalled_not_waiting():
    trace = Trace(num_blocks=4, block_size=2)
    trace.record("arrive", "A", token_ids=range(6))
    trace.record("schedule", "A", token_ids=range(4))
    trace.next_step()
    trace.next_step()  # A holds blocks but got nothing
    trace.record("schedule", "A", token_ids=range(4, 6), first_position=4)
    trace.next_step()
    assert gantt_states(trace).states[0] == [PREFILL, STALLED, PREFILL]


arrivals = st.lists(st.tuples(st.integers(0, 8), st.integers(1, 30), st.integers(1, 10)), min_size=1, max_size=6)


@given(arrivals=arrivals, num_blocks=st.integers(8, 20), budget=st.integers(4, 16), chunked=st.booleans())
def test_states_of_any_schedule_are_consistent(arrivals, num_blocks, budget, chunked):
    block_size = 4
    budget = budget if chunked else max(budget, 30)  # unchunked, a whole prompt must fit a step
    trace = Trace(num_blocks, block_size)
    scheduler = Scheduler(KVCacheManager(num_blocks, block_size, trace), budget, 4, chunked, trace)
    _drive(scheduler, [(step, f"r{i}", p, o) for i, (step, p, o) in enumerate(arrivals)])
    data = gantt_states(trace)
    assert max(data.total_tokens_per_step()) <= budget
    assert data.num_preemptions == scheduler.num_preemptions
    for row, states in enumerate(data.states):
        present = [s for s in states if s is not None]
        assert present and None not in states[states.index(present[0]) : states.index(present[0]) + len(present)]
        computed = [c for c, s in zip(data.chunk_sizes[row], states) if s in COMPUTING]
        assert all(c > 0 for c in computed)
        _, prompt_len, max_tokens = arrivals[int(data.request_ids[row][1:])]
        needed = prompt_len + max_tokens - 1  # the prompt and every output but the last
        assert sum(computed) == needed if PREEMPTED not in states else sum(computed) > needed
        assert (RECOMPUTE in states) == (PREEMPTED in states)
        assert data.finished_at[row] is not None


def test_gantt_builds_headless_and_is_deterministic(example, tmp_path):
    trace, budget = example
    fig = scheduler_gantt(trace, budget)
    assert isinstance(fig, Figure)
    gids = {c.get_gid(): len(c.get_paths()) for c in fig.axes[1].collections if c.get_gid()}
    data = gantt_states(trace)
    for state in (WAITING, PREFILL, DECODE, RECOMPUTE, PREEMPTED):
        assert gids[state] == sum(row.count(state) for row in data.states)
    first = save_figure(fig, tmp_path / "a.png").read_bytes()
    second = save_figure(scheduler_gantt(*example_scheduler_trace()), tmp_path / "b.png").read_bytes()
    assert first == second


def test_gantt_draws_an_empty_trace_and_no_budget():
    assert isinstance(scheduler_gantt(Trace(4, 2)), Figure)


def test_benchmark_figures_draw_the_recorded_schema(tmp_path):
    static, continuous = _result("static batching", 2048, 1.0), _result("continuous batching", 2048, 2.0)
    fig = batching_throughput(static, continuous)
    assert "2.00×" in fig._suptitle.get_text()
    runs = ((256, 1.5), (64, 1.0), (2048, 2.0))
    tradeoff = chunk_size_tradeoff([_result("continuous batching", budget, scale) for budget, scale in runs])
    assert len(tradeoff.axes) == 3
    for name, f in {"a": fig, "b": tradeoff}.items():
        first, second = save_figure(f, tmp_path / f"{name}1.png"), save_figure(f, tmp_path / f"{name}2.png")
        assert first.read_bytes() == second.read_bytes()
