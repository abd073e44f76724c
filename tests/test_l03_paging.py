"""Lesson 03: the block pool and the KV cache manager, as a state machine against their invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from nanoengine.cache.block_pool import BlockPool, NoFreeBlocksError
from nanoengine.cache.kv_cache_manager import KVCacheManager, num_blocks_for_budget, slot_for
from nanoengine.trace import Trace, replay

pytestmark = pytest.mark.l03


class PagingMachine(RuleBasedStateMachine):
    """Requests arrive, grow token by token or chunk by chunk, and finish, in any order."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.manager: KVCacheManager | None = None
        self.tokens: dict[str, list[int]] = {}
        self.next_id = 0

    @precondition(lambda self: self.manager is None)
    @rule(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 8, 16]))
    def start(self, num_blocks, block_size):
        self.manager = KVCacheManager(num_blocks, block_size, Trace(num_blocks, block_size))

    @precondition(lambda self: self.manager is not None)
    @rule(target=requests, length=st.integers(1, 40))
    def add(self, length):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        tokens = list(range(100 * self.next_id, 100 * self.next_id + length))
        free_before = self.manager.num_free_blocks
        if self.manager.allocate_slots(request_id, tokens):
            self.tokens[request_id] = tokens
        else:  # refused: nothing may have changed
            assert self.manager.num_free_blocks == free_before
            assert request_id not in self.manager.tables
        return request_id

    @rule(request_id=requests, extra=st.integers(1, 20))
    def grow(self, request_id, extra):
        if request_id not in self.tokens:
            return
        longer = self.tokens[request_id] + [7] * extra
        table_before = list(self.manager.block_table(request_id))
        if self.manager.allocate_slots(request_id, longer):
            self.tokens[request_id] = longer
            assert self.manager.block_table(request_id)[: len(table_before)] == table_before
        else:
            assert self.manager.block_table(request_id) == table_before

    @rule(request_id=consumes(requests))
    def finish(self, request_id):
        if request_id in self.tokens:
            self.manager.free(request_id)
            del self.tokens[request_id]

    @invariant()
    def blocks_are_accounted_for(self):
        if self.manager is None:
            return
        pool = self.manager.pool
        held = [b for table in self.manager.tables.values() for b in table]
        assert pool.num_free_blocks + len(held) == pool.num_blocks
        for block in pool.blocks:
            assert block.ref_cnt == held.count(block.block_id)
            assert (block.ref_cnt == 0) == (block.block_id in pool.free_queue)

    @invariant()
    def tables_fit_their_tokens(self):
        if self.manager is None:
            return
        assert set(self.manager.tables) == set(self.tokens)
        for request_id, tokens in self.tokens.items():
            assert len(self.manager.block_table(request_id)) == math.ceil(len(tokens) / self.manager.block_size)

    @invariant()
    def the_trace_replays_to_the_real_state(self):
        if self.manager is None:
            return
        last = replay(self.manager.trace)[-1]
        assert last.tables == self.manager.tables
        bs = self.manager.block_size
        for request_id, tokens in self.tokens.items():
            stored = [t for b in self.manager.block_table(request_id) for t in last.tokens[b]]
            assert stored == tokens
            assert all(len(last.tokens[b]) == bs for b in self.manager.block_table(request_id)[:-1])

    def teardown(self):
        if self.manager is None:
            return
        for request_id in list(self.tokens):
            self.manager.free(request_id)
        assert self.manager.num_free_blocks == self.manager.pool.num_blocks


TestPaging = pytest.mark.l03_t2(PagingMachine.TestCase)


@pytest.mark.l03_t1
def test_pool_hands_out_each_block_once_and_takes_it_back():
    pool = BlockPool(4)
    a, b = pool.allocate(3), pool.allocate(1)
    assert sorted(a + b) == [0, 1, 2, 3] and pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free_blocks == 3
    with pytest.raises(ValueError, match="already free"):
        pool.free([a[0]])


@pytest.mark.l03_t3
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_slot_mapping(block_size):
    table = [5, 2, 9]
    for position in range(3 * block_size):
        slot = slot_for(table, position, block_size)
        assert divmod(slot, block_size) == (table[position // block_size], position % block_size)


def test_budget_to_blocks():
    assert num_blocks_for_budget(2**30, 23_040, 16) == 2912


def test_paging_wastes_under_4_percent_and_fits_far_more():
    from nanoengine.bench.datasets import realistic_lengths
    from nanoengine.bench.kv_memory import measure

    lengths = realistic_lengths(400, 8192, seed=1)
    result = measure(2**28, 16, 23_040, 8192, lengths)
    paged, contiguous = result["paged"], result["contiguous"]
    assert paged["waste_share"] < 0.04
    assert paged["requests_fit"] > 5 * contiguous["requests_fit"]
    totals = [p + o for p, o in lengths[: paged["requests_fit"]]]
    assert paged["used_tokens"] == sum(totals)
    assert paged["reserved_tokens"] == sum(-(-t // 16) * 16 for t in totals)


@pytest.mark.parametrize("text, expected", [("1024", 1024), ("512MiB", 512 * 2**20), ("1GiB", 2**30),
                                            ("2gb", 2 * 10**9), ("1.5KiB", 1536)])
def test_parse_size(text, expected):
    from nanoengine.config import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1 parsec", "-1GiB"])
def test_parse_size_rejects_nonsense(text):
    from nanoengine.config import parse_size

    with pytest.raises(ValueError, match="as a size"):
        parse_size(text)
