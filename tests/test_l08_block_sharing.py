"""Lesson 08 without a model: block hashes, prefix hits, eviction, fork and copy-on-write,
as unit tests and as a state machine over the cache manager's invariants. Copy-on-write
runs inside ``allocate_slots`` before lesson 03's allocation: its tests start from tables
shared by hand (``_hold``), so that they run nothing else of the lesson first."""

from __future__ import annotations

import collections
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from nanoengine.cache.block_pool import BlockPool
from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.cache.prefix_hash import block_hashes, hash_block_tokens
from nanoengine.trace import Trace, replay

pytestmark = pytest.mark.l08


@pytest.mark.l08_t1
def test_a_block_hash_names_its_whole_prefix():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, [1, 2, 3, 4]) and len(a) == 32
    assert a != hash_block_tokens(None, [1, 2, 3, 5])
    assert hash_block_tokens(a, [9, 9]) != hash_block_tokens(None, [9, 9]), "the parent must count"
    assert hash_block_tokens(None, [1, 2], ("lora-a",)) != hash_block_tokens(None, [1, 2]), "extra keys must count"
    assert hash_block_tokens(None, [1, 2], ("lora-a",)) != hash_block_tokens(None, [1, 2], ("lora-b",))
    assert hash_block_tokens(None, [1, 23]) != hash_block_tokens(None, [12, 3])
    hashes = block_hashes(list(range(10)), 4)
    assert len(hashes) == 2, "only full blocks are named"
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7])
    assert block_hashes(list(range(10)), 4, known=hashes[:1]) == hashes


@pytest.mark.l08_t1
@given(a=st.lists(st.integers(0, 2), max_size=12), block_size=st.integers(1, 4), data=st.data())
def test_two_sequences_share_a_block_hash_exactly_when_they_share_the_prefix_up_to_it(a, block_size, data):
    """``b`` is ``a`` (three token ids, so blocks often repeat) edited from a drawn point on:
    the rest shuffled, or one token replaced."""
    cut = data.draw(st.integers(0, len(a)))
    rest = a[cut:]
    b = a[:cut] + data.draw(st.permutations(rest) | st.integers(0, 2).map(lambda token: [token] + rest[1:]))
    hashes_a, hashes_b = block_hashes(a, block_size), block_hashes(b, block_size)
    assert (len(hashes_a), len(hashes_b)) == (len(a) // block_size, len(b) // block_size), "one per full block"
    for i, (x, y) in enumerate(zip(hashes_a, hashes_b)):
        assert (x == y) == (a[: (i + 1) * block_size] == b[: (i + 1) * block_size]), f"block {i}"


@pytest.mark.l08_t2
def test_a_new_request_reuses_the_cached_full_blocks_of_its_prefix():
    manager = KVCacheManager(16, 4, enable_prefix_caching=True)
    first = list(range(10))  # blocks [0 1 2 3] [4 5 6 7] [8 9]
    assert manager.get_computed_blocks(first) == []
    assert manager.allocate_slots("a", first)
    second = list(range(8)) + [50, 51, 52]
    hit = manager.get_computed_blocks(second)
    assert hit == manager.block_table("a")[:2], "both full blocks of the shared prefix are hits"
    assert manager.allocate_slots("b", second, hit)
    assert manager.block_table("b")[:2] == hit and manager.pool.blocks[hit[0]].ref_cnt == 2
    # a sequence that is all cached still computes its last token: the last block is not a hit
    assert len(manager.get_computed_blocks(list(range(8)))) == 1
    assert len(manager.get_computed_blocks(list(range(9)))) == 2


@pytest.mark.l08_t2
def test_released_blocks_stay_cached_until_evicted_least_recently_used_first():
    manager = KVCacheManager(4, 2, Trace(4, 2), enable_prefix_caching=True)
    assert manager.get_computed_blocks([1, 2, 3, 4, 9]) == [], "nothing is cached yet"
    assert manager.allocate_slots("a", [1, 2, 3, 4, 5])  # three blocks, two full
    manager.free("a")
    assert manager.num_free_blocks == 4, "a cached block nobody holds is free to reuse"
    assert len(manager.get_computed_blocks([1, 2, 3, 4, 9])) == 2, "and still serves hits"
    # the never-used block goes first, then a's blocks, tail (the uncached partial one) first
    assert manager.allocate_slots("b", [7] * 5)
    assert len(manager.get_computed_blocks([1, 2, 3, 4, 9])) == 1, "the tail of a's prefix was evicted first"
    assert manager.allocate_slots("b", [7] * 8)
    assert manager.get_computed_blocks([1, 2, 3, 4, 9]) == [], "an evicted block is never served"
    assert [e.kind for e in manager.trace.events].count("evict") == 2


@pytest.mark.l08_t2
def test_a_hit_on_a_free_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(4)
    pool.cache(2, b"some prefix")  # block 2 was released still caching a prefix
    pool.touch([2])
    assert pool.blocks[2].ref_cnt == 1 and list(pool.free_queue) == [0, 1, 3]
    pool.touch([2])  # a second table shares it
    assert pool.blocks[2].ref_cnt == 2 and pool.num_free_blocks == 3
    assert pool.lookup(b"some prefix") == 2, "a hit keeps the block cached"


def _hold(manager, tables, num_tokens):
    """Hand-made state: each request of ``tables`` holds its table and ``num_tokens`` tokens; a
    block's reference count is the number of tables holding it (what forking leaves)."""
    for request_id, table in tables.items():
        manager.tables[request_id] = list(table)
        manager.num_tokens[request_id] = num_tokens
    for block, holders in collections.Counter(b for t in tables.values() for b in t).items():
        manager.pool.free_queue.remove(block)
        manager.pool.blocks[block].ref_cnt = holders


def _assert_counts_match_the_tables(manager):
    held = collections.Counter(b for table in manager.tables.values() for b in table)
    assert [b.ref_cnt for b in manager.pool.blocks] == [held[b.block_id] for b in manager.pool.blocks]
    assert all((b.ref_cnt == 0) == (b.block_id in manager.pool.free_queue) for b in manager.pool.blocks)


@pytest.mark.l08_t3
def test_a_write_into_a_shared_partly_filled_block_copies_it_first():
    manager = KVCacheManager(8, 4)
    full, partial = 3, 5
    _hold(manager, {"c0": [full, partial], "c1": [full, partial]}, num_tokens=6)
    assert manager.allocate_slots("c0", [1] * 6 + [2])
    own = manager.block_table("c0")[1]
    assert own not in (full, partial) and manager.block_table("c0")[0] == full
    assert manager.take_pending_copies() == [(partial, own)] and manager.take_pending_copies() == []
    assert manager.num_free_blocks == 8 - 3
    _assert_counts_match_the_tables(manager)
    assert manager.allocate_slots("c1", [1] * 6 + [3])
    assert manager.block_table("c1") == [full, partial], "the last holder writes in place"
    assert manager.take_pending_copies() == []


@pytest.mark.l08_t3
@given(block_size=st.integers(2, 4), num_full=st.integers(0, 2), data=st.data())
def test_writers_of_a_shared_block_copy_it_until_one_holder_is_left(block_size, num_full, data):
    """Sharers of a table write into its last, partly filled block in any order, some spilling
    into a new block: each copies the shared block first, except the one left holding it."""
    num_tokens = num_full * block_size + data.draw(st.integers(1, block_size - 1))
    sharers = [f"s{i}" for i in range(data.draw(st.integers(2, 4)))]
    table = list(range(num_full + 1))
    manager = KVCacheManager(num_full + 2 + 2 * len(sharers), block_size)
    _hold(manager, {s: table for s in sharers}, num_tokens)
    for writer in data.draw(st.permutations(sharers)):
        holders = sum(manager.block_table(s)[num_full] == table[-1] for s in sharers)
        assert manager.allocate_slots(writer, [7] * (num_tokens + data.draw(st.integers(1, block_size))))
        copies, written = manager.take_pending_copies(), manager.block_table(writer)[num_full]
        assert manager.block_table(writer)[:num_full] == table[:-1], "full blocks stay shared"
        if holders > 1:
            assert copies == [(table[-1], written)] and written != table[-1]
        else:
            assert copies == [] and written == table[-1], "the last holder writes in place"
        _assert_counts_match_the_tables(manager)


def test_fork_shares_every_block_and_a_write_copies_the_shared_one():
    manager = KVCacheManager(8, 4, Trace(8, 4))
    assert manager.allocate_slots("p", [1] * 6)  # one full block, one half-full
    manager.fork("p", "c0")
    manager.fork("p", "c1")
    manager.free("p")
    full, partial = manager.block_table("c0")
    assert manager.block_table("c1") == [full, partial] and manager.pool.blocks[partial].ref_cnt == 2
    assert manager.num_free_blocks == 6, "forking costs no memory"
    assert manager.allocate_slots("c0", [1] * 6 + [2])
    own = manager.block_table("c0")[1]
    assert own != partial and manager.block_table("c0")[0] == full
    assert manager.take_pending_copies() == [(partial, own)] and manager.take_pending_copies() == []
    assert manager.allocate_slots("c1", [1] * 6 + [3])
    assert manager.block_table("c1") == [full, partial], "the last holder writes in place"
    assert manager.take_pending_copies() == []


def test_a_fork_at_a_block_boundary_copies_nothing():
    manager = KVCacheManager(8, 4)
    assert manager.allocate_slots("p", [1] * 8)
    manager.fork("p", "c")
    assert manager.allocate_slots("c", [1] * 9) and manager.allocate_slots("p", [1] * 9)
    assert manager.take_pending_copies() == []
    assert manager.block_table("c")[:2] == manager.block_table("p")[:2]


def test_a_refused_allocation_changes_nothing():
    manager = KVCacheManager(3, 2, enable_prefix_caching=True)
    assert manager.allocate_slots("a", [1, 2, 3, 4, 5])
    manager.fork("a", "b")
    before = (dict(manager.tables), manager.num_free_blocks)
    assert not manager.allocate_slots("b", [1, 2, 3, 4, 5, 6, 7, 8])  # needs a copy and a block; 0 free
    assert (dict(manager.tables), manager.num_free_blocks) == before and manager.pending_copies == []


class SharingMachine(RuleBasedStateMachine):
    """Requests drawn from a few shared prefixes arrive, grow, fork and finish in any order,
    with prefix caching on; a model of what each block holds checks every hit."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.manager: KVCacheManager | None = None
        self.tokens: dict[str, list[int]] = {}
        self.content: dict[int, list[int]] = {}  # what the "worker" wrote into each block
        self.next_id = 0

    @precondition(lambda self: self.manager is None)
    @rule(num_blocks=st.integers(2, 20), block_size=st.sampled_from([1, 2, 3, 4]))
    def start(self, num_blocks, block_size):
        self.manager = KVCacheManager(num_blocks, block_size, Trace(num_blocks, block_size), enable_prefix_caching=True)

    def _write(self, request_id: str, start: int) -> None:
        """Play the worker: make the step's copies, then write the new tokens in their slots."""
        manager = self.manager
        for src, dst in manager.take_pending_copies():
            self.content[dst] = list(self.content[src])
        table, size = manager.block_table(request_id), manager.block_size
        for position in range(start, len(self.tokens[request_id])):
            block = table[position // size]
            assert manager.pool.blocks[block].ref_cnt == 1, "a block is written while shared"
            held = self.content.setdefault(block, [])
            del held[position % size :]
            held.append(self.tokens[request_id][position])

    @precondition(lambda self: self.manager is not None)
    @rule(target=requests, prefix=st.sampled_from([0, 1, 2]), length=st.integers(1, 12), tail=st.integers(0, 3))
    def add(self, prefix, length, tail):
        tokens = [100 * prefix + i for i in range(length)] + [999] * tail
        request_id = f"r{self.next_id}"
        self.next_id += 1
        hit = self.manager.get_computed_blocks(tokens)
        for i, block in enumerate(hit):  # a hit must hold exactly these tokens: never a stale block
            size = self.manager.block_size
            assert self.content[block] == tokens[i * size : (i + 1) * size]
        if not self.manager.allocate_slots(request_id, tokens, hit):
            return consumes(self.requests)  # nothing to hand on (hypothesis needs a value)
        self.tokens[request_id] = tokens
        self._write(request_id, len(hit) * self.manager.block_size)
        return request_id

    def _settled(self, request_id: str) -> bool:
        """Whether the request is live and may grow or fork now (a subclass may hold it back)."""
        return request_id in self.tokens

    def _held(self, request_id: str) -> int:
        """The slots the request's table must cover."""
        return len(self.tokens[request_id])

    @rule(request_id=requests, extra=st.integers(1, 5))
    def grow(self, request_id, extra):
        if not self._settled(request_id):
            return
        start = len(self.tokens[request_id])
        new = self.tokens[request_id] + [7] * extra
        if self.manager.allocate_slots(request_id, new):
            self.tokens[request_id] = new
            self._write(request_id, start)

    @rule(target=requests, request_id=requests)
    def fork(self, request_id):
        if not self._settled(request_id):
            return consumes(self.requests)
        child = f"r{self.next_id}"
        self.next_id += 1
        self.manager.fork(request_id, child)
        self.tokens[child] = list(self.tokens[request_id])
        return child

    @rule(request_id=consumes(requests))
    def finish(self, request_id):
        if request_id in self.tokens:
            self.manager.free(request_id)
            del self.tokens[request_id]

    @invariant()
    def reference_counts_count_tables(self):
        if self.manager is None:
            return
        pool = self.manager.pool
        holders = [0] * pool.num_blocks
        for table in self.manager.tables.values():
            for block in table:
                holders[block] += 1
        assert [b.ref_cnt for b in pool.blocks] == holders
        assert all((b.ref_cnt == 0) == (b.block_id in pool.free_queue) for b in pool.blocks)
        assert {h: b.block_id for b in pool.blocks if b.block_hash is not None for h in [b.block_hash]} == pool.cached

    @invariant()
    def tables_fit_their_tokens(self):
        if self.manager is None:
            return
        assert set(self.manager.tables) == set(self.tokens)
        for request_id in self.tokens:
            assert len(self.manager.block_table(request_id)) == math.ceil(self._held(request_id) / self.manager.block_size)

    @invariant()
    def cached_blocks_hold_their_prefix(self):
        if self.manager is None:
            return
        for request_id, tokens in self.tokens.items():
            hashes = block_hashes(tokens, self.manager.block_size)
            for block, block_hash in zip(self.manager.block_table(request_id), hashes):
                cached = self.manager.pool.lookup(block_hash)
                if cached is not None:
                    size = self.manager.block_size
                    assert self.content[cached] == tokens[hashes.index(block_hash) * size :][:size]

    @invariant()
    def the_trace_replays_to_the_real_state(self):
        if self.manager is None:
            return
        last = replay(self.manager.trace)[-1]
        assert last.tables == self.manager.tables
        assert last.ref_cnt == [b.ref_cnt for b in self.manager.pool.blocks]
        assert last.cached == [b.block_hash is not None for b in self.manager.pool.blocks]


TestSharingMachine = SharingMachine.TestCase
