"""Lesson 08's picture: the example prefix-cache story tells what it says, the tree read from a
trace is faithful (parents, hits, sharing, eviction order), and the figure is deterministic."""

from __future__ import annotations

import matplotlib
import pytest
from hypothesis import given
from hypothesis import strategies as st

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from nanoengine.cache.kv_cache_manager import KVCacheManager  # noqa: E402
from nanoengine.trace import Trace, replay  # noqa: E402
from nanoengine.viz import (  # noqa: E402
    cache_hits_per_request,
    example_prefix_manager,
    example_prefix_trace,
    prefix_tree,
    prefix_tree_nodes,
)
from nanoengine.viz.examples import SYSTEM_PROMPT  # noqa: E402
from nanoengine.viz.style import figure_png  # noqa: E402

pytestmark = pytest.mark.l08


@pytest.fixture(scope="module")
def manager():
    return example_prefix_manager()


@pytest.fixture(scope="module")
def nodes(manager):
    return prefix_tree_nodes(manager.trace)


def _manager(num_blocks: int = 16, block_size: int = 2) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, trace=Trace(num_blocks, block_size), enable_prefix_caching=True)


def _admit(manager: KVCacheManager, request_id: str, tokens: list[int]) -> list[int]:
    hit = manager.get_computed_blocks(tokens)
    assert manager.allocate_slots(request_id, tokens, hit)
    return hit


def test_the_story_shares_the_system_prompt_then_evicts_lru_tail_first(manager):
    trace = manager.trace
    assert cache_hits_per_request(trace) == {"A": 0, "B": 2, "C": 2, "D": 0, "E": 3}
    assert [e.block_ids for e in trace.events if e.kind == "evict"] == [(3,), (2,), (5,)]
    assert manager.tables["E"][:3] == [0, 1, 4], "E takes the system prompt and B's question back"
    last = replay(trace)[-1]
    assert last.tables == manager.tables
    assert [last.tokens[b] for b in (0, 1)] == [list(SYSTEM_PROMPT[:4]), list(SYSTEM_PROMPT[4:])]
    assert [b for b, cached in enumerate(last.cached) if cached] == [0, 1, 3, 4, 6, 7, 8, 9]
    assert last.ref_cnt[0] == last.ref_cnt[1] == 1, "only E holds the system prompt at the end"


def test_tree_of_the_story(nodes):
    assert [(n.block_id, n.use) for n in nodes] == [(0, 1), (1, 1), (2, 1), (4, 1), (3, 1), (5, 1), (6, 1),
                                                    (8, 1), (9, 1), (7, 1), (3, 2)]
    parent = {(n.block_id, n.use): (nodes[n.parent].block_id if n.parent is not None else None) for n in nodes}
    assert parent == {(0, 1): None, (1, 1): 0, (2, 1): 1, (3, 1): 2, (4, 1): 1, (5, 1): 4, (6, 1): 1,
                      (8, 1): None, (9, 1): 8, (7, 1): 9, (3, 2): 7}
    assert all(n.depth == (nodes[n.parent].depth + 1 if n.parent is not None else 0) for n in nodes)
    assert {n.block_id: n.hits for n in nodes if n.hits} == {0: 3, 1: 3, 4: 1}
    assert [n.block_id for n in nodes if n.shared] == [0, 1, 4]
    assert {(n.block_id, n.use): n.evicted for n in nodes if n.evicted} == {(3, 1): 1, (2, 1): 2, (5, 1): 3}
    assert nodes[-1].tokens == (413, 414, 415, 416) and nodes[-1].request_id == "D"


def test_a_fork_makes_a_node_shared_without_a_hit():
    manager = _manager()
    _admit(manager, "p", [1, 2, 3, 4, 5])
    manager.fork("p", "c")
    nodes = prefix_tree_nodes(manager.trace)
    assert [(n.block_id, n.hits, n.shared) for n in nodes] == [(0, 0, True), (1, 0, True)]


def test_a_block_computed_twice_at_once_hangs_under_the_registered_copy():
    """Both requests looked the prefix up before either registered it: the second copy of
    block [1, 2] is not registered, and the second request's next block must still hang under
    the first copy (a parent found by table position would be an unregistered block)."""
    manager = _manager()
    first, second = [1, 2, 3, 4, 9], [1, 2, 5, 6, 9]
    hits = [manager.get_computed_blocks(first), manager.get_computed_blocks(second)]
    assert hits == [[], []]
    assert manager.allocate_slots("a", first) and manager.allocate_slots("b", second)
    nodes = prefix_tree_nodes(manager.trace)
    assert [(n.request_id, n.tokens) for n in nodes] == [("a", (1, 2)), ("a", (3, 4)), ("b", (5, 6))]
    assert [n.parent for n in nodes] == [None, 0, 0]


requests = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 7), st.booleans()), min_size=1, max_size=12)


@given(requests=requests)
def test_any_run_gives_a_consistent_tree(requests):
    """Requests draw one of three prefixes plus a suffix; some finish; the pool is small, so
    blocks are evicted and reused."""
    manager, live = _manager(num_blocks=10), []
    for i, (prefix, suffix, finish) in enumerate(requests):
        tokens = [100 * prefix + t for t in range(1, 5)] + [1000 + 10 * i + t for t in range(suffix)]
        hit = manager.get_computed_blocks(tokens)
        if manager.allocate_slots(f"r{i}", tokens, hit):
            live.append(f"r{i}")
        if finish and live:
            manager.free(live.pop(0))
    trace = manager.trace
    nodes = prefix_tree_nodes(trace)
    assert len(nodes) == sum(e.kind == "cache" for e in trace.events)
    evictions = [e.block_ids[0] for e in trace.events if e.kind == "evict"]
    assert sorted(n.evicted for n in nodes if n.evicted) == list(range(1, len(evictions) + 1))
    assert [n.block_id for n in sorted((n for n in nodes if n.evicted), key=lambda n: n.evicted)] == evictions
    assert sum(n.hits for n in nodes) == sum(cache_hits_per_request(trace).values())
    for n in nodes:
        assert len(n.tokens) == trace.block_size and n.shared == (n.hits > 0)
        if n.parent is not None:
            assert nodes[n.parent].depth == n.depth - 1
    still_cached = {n.block_id for n in nodes if n.evicted is None}
    assert still_cached == set(manager.pool.cached.values())


def test_prefix_tree_draws_every_node_and_is_deterministic(manager, nodes):
    fig = prefix_tree(manager.trace)
    assert isinstance(fig, Figure)
    gids = [p.get_gid() for p in fig.axes[0].patches]
    assert gids.count("cached") + gids.count("evicted") == len(nodes)
    assert gids.count("evicted") == 3 and gids.count("shared") == 3
    assert figure_png(fig) == figure_png(prefix_tree(example_prefix_trace()))


def test_prefix_tree_draws_a_trace_without_prefix_caching():
    manager = KVCacheManager(4, 2, trace=Trace(4, 2))
    manager.allocate_slots("a", [1, 2, 3])
    assert prefix_tree_nodes(manager.trace) == []
    assert isinstance(prefix_tree(manager.trace), Figure)
    assert isinstance(prefix_tree(Trace(4, 2)), Figure)
