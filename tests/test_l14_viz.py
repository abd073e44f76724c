"""Lesson 14's picture: the Gantt chart coloured by adapter reads the trace faithfully (every
cell in its request's adapter's colour, the step's adapters never more than ``max_loras``),
shows a request waiting for a slot in the example, and builds headless and deterministically."""

from __future__ import annotations

import matplotlib
import pytest
from hypothesis import given
from hypothesis import strategies as st

matplotlib.use("Agg")

from matplotlib.colors import same_color  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nanoengine.cache.kv_cache_manager import KVCacheManager  # noqa: E402
from nanoengine.lora.request import LoRARequest  # noqa: E402
from nanoengine.request import Request  # noqa: E402
from nanoengine.sampling_params import SamplingParams  # noqa: E402
from nanoengine.scheduler import Scheduler  # noqa: E402
from nanoengine.scheduler.simulate import simulate_step  # noqa: E402
from nanoengine.trace import Trace  # noqa: E402
from nanoengine.viz import adapter_gantt, example_lora_trace, gantt_states, save_figure, step_adapters  # noqa: E402
from nanoengine.viz.gantt import BASE_MODEL, COMPUTING, DECODE, PREFILL, WAITING  # noqa: E402

pytestmark = pytest.mark.l14


@pytest.fixture(scope="module")
def example():
    return example_lora_trace()


def _cells(fig: Figure) -> dict[str, object]:
    """The chart's collections by gid, ``"{adapter}:{state}"``."""
    return {c.get_gid(): c for c in fig.axes[1].collections if c.get_gid()}


def test_the_example_makes_an_adapter_wait_for_a_slot_while_the_base_model_runs(example):
    trace, adapter_of, max_loras = example
    data = gantt_states(trace)
    per_step = step_adapters(data, adapter_of)
    assert max_loras == 2 and max(len(names) for names in per_step) == max_loras
    assert len({a for a in adapter_of.values() if a}) > max_loras, "every adapter would fit: nothing to show"
    waited = [row for row, rid in enumerate(data.request_ids)
              if adapter_of[rid] and WAITING in data.states[row]]
    assert waited, "no request waited for an adapter slot"
    first_wait = min(data.states[row].index(WAITING) for row in waited)
    started = [row for row, rid in enumerate(data.request_ids) if adapter_of[rid] is None
               and data.states[row][first_wait] in COMPUTING]
    assert started, "the base model's requests should run while an adapter waits"


def test_step_adapters_are_those_of_the_requests_computing_in_the_step():
    trace = Trace(num_blocks=8, block_size=2)
    for rid, prompt in (("a", 3), ("b", 2), ("c", 2)):
        trace.record("arrive", rid, token_ids=range(prompt))
    trace.record("schedule", "a", token_ids=range(3))
    trace.record("schedule", "b", token_ids=range(2))
    trace.next_step()  # step 0: a (x) and b (base) prefill, c (y) waits
    trace.record("schedule", "a", token_ids=[9], first_position=3)
    trace.record("schedule", "c", token_ids=range(2))
    trace.next_step()  # step 1: a decodes, c prefills, b stalls (holds blocks, no budget)
    trace.record("finish", "a")
    trace.record("schedule", "c", token_ids=[9], first_position=2)
    trace.next_step()
    adapter_of = {"a": "x", "b": None, "c": "y"}
    data = gantt_states(trace)
    assert step_adapters(data, adapter_of) == [["x"], ["x", "y"], ["y"]]
    fig = adapter_gantt(trace, adapter_of, max_loras=2)
    cells = _cells(fig)
    assert {gid: len(c.get_paths()) for gid, c in cells.items()} == {
        "x:prefill": 1, "x:decode": 1, f"{BASE_MODEL}:prefill": 1, f"{BASE_MODEL}:stalled": 2,
        "y:waiting": 1, "y:prefill": 1, "y:decode": 1}
    bars = {patch.get_gid() for patch in fig.axes[0].patches}
    assert bars == {"x", "y"}, "the top panel stacks the adapters each step ran, not the base model"


def test_every_cell_has_its_adapters_colour_pale_while_waiting(example):
    trace, adapter_of, max_loras = example
    data = gantt_states(trace)
    cells = _cells(adapter_gantt(trace, adapter_of, max_loras))
    names = [adapter_of[rid] or BASE_MODEL for rid in data.request_ids]
    expected = {}
    for name, states in zip(names, data.states):
        for state in filter(None, states):
            expected[f"{name}:{state}"] = expected.get(f"{name}:{state}", 0) + 1
    assert {gid: len(c.get_paths()) for gid, c in cells.items()} == expected
    solid = {gid.split(":")[0]: c.get_facecolor()[0] for gid, c in cells.items() if gid.endswith(f":{DECODE}")}
    assert same_color(solid[BASE_MODEL][:3], "#8C8C8C"), "the base model is grey"
    assert len({tuple(color) for color in solid.values()}) == len(solid), "two adapters share a colour"
    for gid, collection in cells.items():
        name, state = gid.split(":")
        face = collection.get_facecolor()[0]
        if state == PREFILL:
            assert same_color(face, solid[name]) and collection.get_hatch()
        if state == WAITING:
            assert all(f >= s for f, s in zip(face[:3], solid[name][:3])) and not same_color(face, solid[name])


loads = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 12), st.integers(1, 6), st.sampled_from([None, 1, 2, 3])),
                 min_size=1, max_size=8)


@given(loads=loads, max_loras=st.integers(1, 3), budget=st.integers(4, 16))
def test_no_step_runs_more_adapters_than_max_loras(loads, max_loras, budget):
    trace = Trace(64, 4)
    scheduler = Scheduler(KVCacheManager(64, 4, trace), budget, 4, trace=trace, max_loras=max_loras)
    pending, step = sorted((arrival, i, p, o, lora) for i, (arrival, p, o, lora) in enumerate(loads)), 0
    while pending or scheduler.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, i, prompt_len, output_len, lora = pending.pop(0)
            scheduler.add_request(Request(f"r{i}", None, [3] * prompt_len, SamplingParams(max_tokens=output_len),
                                          frozenset(), float(step),
                                          lora_request=lora and LoRARequest(f"l{lora}", lora, f"/l{lora}")))
        simulate_step(scheduler)
        step += 1
        assert step < 500
    adapter_of = {f"r{i}": lora and f"l{lora}" for i, (*_, lora) in enumerate(loads)}
    per_step = step_adapters(gantt_states(trace), adapter_of)
    assert max(map(len, per_step)) <= max_loras
    assert set().union(*map(set, per_step)) == {name for name in adapter_of.values() if name}


def test_adapter_gantt_builds_headless_and_is_deterministic(example, tmp_path):
    fig = adapter_gantt(*example)
    assert isinstance(fig, Figure)
    first = save_figure(fig, tmp_path / "a.png").read_bytes()
    assert first == save_figure(adapter_gantt(*example_lora_trace()), tmp_path / "b.png").read_bytes()
    assert isinstance(adapter_gantt(Trace(4, 2), {}), Figure)
