"""Lesson 03's pictures: built headless from the example trace, deterministic, and faithful to the pool."""

from __future__ import annotations

import sys

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import ConnectionPatch  # noqa: E402

from nanoengine.trace import replay  # noqa: E402
from nanoengine.viz import (  # noqa: E402
    allocation_animation,
    block_pool_grid,
    block_tables,
    example_paging_manager,
    example_paging_trace,
    explore,
    paged_vs_contiguous,
    save_figure,
    slot_states,
    trace_colors,
)
from nanoengine.viz.block_pool import FILLED, FREE, RESERVED  # noqa: E402

pytestmark = pytest.mark.l03

# The schema of docs/bench/l03_kv_memory.json, with made-up numbers.
MEMORY_RESULT = {
    "budget_bytes": 2**30, "block_size": 16, "bytes_per_token": 23_040, "max_model_len": 8192,
    "model": "SmolLM2-135M-Instruct", "num_requests_offered": 100,
    "contiguous": {"requests_fit": 5, "reserved_tokens": 40_960, "used_tokens": 2_000,
                   "waste_share": 1 - 2_000 / 40_960},
    "paged": {"requests_fit": 90, "reserved_tokens": 46_400, "used_tokens": 45_700,
              "waste_share": 1 - 45_700 / 46_400},
}


@pytest.fixture(scope="module")
def manager():
    return example_paging_manager()


@pytest.fixture(scope="module")
def last(manager):
    return replay(manager.trace)[-1]


def _collection_sizes(fig: Figure) -> dict[str, int]:
    return {c.get_gid(): len(c.get_paths()) for c in fig.axes[0].collections if c.get_gid()}


def test_replay_ends_with_the_managers_block_tables(manager, last):
    assert last.tables == manager.tables
    assert {r: sum(len(last.tokens[b]) for b in t) for r, t in last.tables.items()} == manager.num_tokens
    assert sum(owner is None for owner in last.owner) == manager.num_free_blocks


def test_the_example_scatters_blocks_and_leaves_partial_ones(manager, last):
    assert any(t != list(range(t[0], t[0] + len(t))) for t in manager.tables.values()), "some table is not a run"
    assert any(owner is None for owner in last.owner[: max(max(t) for t in manager.tables.values())]), "no hole"
    assert all(n % manager.block_size for n in manager.num_tokens.values()), "every last block is partial"


def test_slot_states_fill_each_table_in_order(manager, last):
    states = slot_states(last, manager.block_size)
    for request_id, table in manager.tables.items():
        n, slots = manager.num_tokens[request_id], len(table) * manager.block_size
        assert [s for b in table for s in states[b]] == [FILLED] * n + [RESERVED] * (slots - n)
    assert all(states[b] == [FREE] * manager.block_size for b, owner in enumerate(last.owner) if owner is None)


def test_the_grid_draws_partial_blocks_partial(manager, last):
    sizes = _collection_sizes(block_pool_grid(last, manager.block_size))
    reserved_slots = sum(len(t) for t in manager.tables.values()) * manager.block_size
    assert sizes[FILLED] == sum(manager.num_tokens.values())
    assert sizes[RESERVED] == reserved_slots - sum(manager.num_tokens.values()) > 0
    assert sizes[FREE] == manager.num_free_blocks


def test_block_tables_draw_one_arrow_per_table_entry(manager, last):
    fig = block_tables(last, manager.block_size)
    arrows = [a for a in fig.artists if isinstance(a, ConnectionPatch)]
    assert len(arrows) == sum(len(t) for t in manager.tables.values())


def test_paged_vs_contiguous_annotates_the_waste():
    fig = paged_vs_contiguous(MEMORY_RESULT)
    texts = {t.get_text().strip() for ax in fig.axes for t in ax.texts}
    assert {"95.1% wasted", "1.5% wasted", "90 (18.0×)"} <= texts


def test_the_same_trace_gives_the_same_pixels(tmp_path):
    def figures():
        trace = example_paging_trace()
        snapshot, colors = replay(trace)[3], trace_colors(trace)
        return {"grid": block_pool_grid(snapshot, trace.block_size, colors=colors),
                "tables": block_tables(snapshot, trace.block_size, colors=colors),
                "memory": paged_vs_contiguous(MEMORY_RESULT)}

    first, second = figures(), figures()
    for name in first:
        a = save_figure(first[name], tmp_path / f"{name}_1.png").read_bytes()
        b = save_figure(second[name], tmp_path / f"{name}_2.png").read_bytes()
        assert a == b, name


def test_the_animation_has_one_frame_per_snapshot():
    trace = example_paging_trace()
    html = allocation_animation(trace).to_jshtml()
    assert html.count("data:image/png;base64") == len(replay(trace))


def test_explore_without_ipywidgets_is_the_html_player(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` raise ImportError
    trace = example_paging_trace()
    assert explore(trace).data.count("data:image/png;base64") == len(replay(trace))


def test_explore_with_ipywidgets_redraws_on_the_slider():
    pytest.importorskip("ipywidgets")
    box = explore(example_paging_trace())
    slider, image = box.children
    first = image.value
    slider.value = slider.max
    assert image.value != first
