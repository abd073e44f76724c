"""Paged batches built by hand, for testing one attention kernel at a time.

Each sequence's blocks are scattered over a pool, every token's K/V is stored at its block
and offset, and the step's attention metadata is written out; none of it comes from the
engine's own code (lessons 03–04's tasks), so a kernel's test runs that kernel and nothing
else a learner writes. A dense float64 attention is the oracle. Every slot no sequence owns
holds NaN, block 0 included (the one block-table padding points at, never owned), and each
table has at least one padding column: a kernel that reads outside its sequence fails loudly.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from nanoengine.attention.metadata import AttentionMetadata

BLOCK_SIZES = [1, 2, 3, 4, 8, 16]


def dense_reference(q, k, v, scale, q_offset, window=None):
    """One sequence, float64, one query head at a time: the obvious way. Query ``i`` sits at
    position ``q_offset + i`` of the keys ``k`` / values ``v`` and sees the keys up to its own
    (with a sliding ``window``, only the last ``window`` of them)."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    query_pos = torch.arange(num_tokens)[:, None] + q_offset
    key_pos = torch.arange(k.shape[0])[None, :]
    future = (key_pos > query_pos) | (key_pos <= query_pos - (window or len(k) + num_tokens + q_offset))
    for h in range(num_heads):
        scores = (q[:, h].double() @ k[:, h // group].double().T) * scale
        out[:, h] = scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, h // group].double()
    return out


@dataclasses.dataclass
class PagedBatch:
    """One step: sequence ``i`` has ``seqs[i] = (cached, new)`` tokens in blocks ``tables[i]``;
    ``keys[i]`` / ``values[i]`` are the K/V of all its tokens (``[cached + new, Hkv, D]``), and
    ``q`` the new tokens' queries, sequence after sequence (``[T, Hq, D]``)."""

    seqs: list[tuple[int, int]]
    tables: list[list[int]]
    num_blocks: int
    block_size: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    q: torch.Tensor

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def empty_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V pools, ``[num_blocks, block_size, Hkv, D]``, all NaN."""
        shape = (self.num_blocks, self.block_size, *self.keys[0].shape[1:])
        return tuple(torch.full(shape, float("nan"), dtype=self.q.dtype) for _ in "kv")

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools holding every token's K/V, cached and new (as after the step's write):
        position ``p`` of sequence ``i`` at block ``tables[i][p // block_size]``, offset ``p % block_size``."""
        k_cache, v_cache = self.empty_pool()
        for table, keys, values in zip(self.tables, self.keys, self.values):
            for pos in range(len(keys)):
                k_cache[table[pos // self.block_size], pos % self.block_size] = keys[pos]
                v_cache[table[pos // self.block_size], pos % self.block_size] = values[pos]
        return k_cache, v_cache

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' K and V, in batch order (``[T, Hkv, D]``)."""
        return tuple(torch.cat([x[cached:] for x, (cached, _) in zip(xs, self.seqs)])
                     for xs in (self.keys, self.values))

    def metadata(self) -> AttentionMetadata:
        """The step's metadata, written out: each table padded with block 0 and one column more."""
        starts = [0]
        for _, new in self.seqs:
            starts.append(starts[-1] + new)
        slot_ids = torch.arange(self.num_blocks * self.block_size).view(self.num_blocks, self.block_size)
        slots = [int(slot_ids[table[pos // self.block_size], pos % self.block_size])
                 for table, (cached, new) in zip(self.tables, self.seqs) for pos in range(cached, cached + new)]
        width = max(len(t) for t in self.tables) + 1
        return AttentionMetadata(
            query_start_loc=starts,
            seq_lens=[cached + new for cached, new in self.seqs],
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=self.block_size,
        )

    def decode_args(self) -> tuple:
        """``(q, k_cache, v_cache, block_tables, seq_lens)`` of a decode kernel (one new token per
        sequence), the pools holding every token."""
        assert all(new == 1 for _, new in self.seqs), "a decode kernel takes one new token per sequence"
        meta = self.metadata()
        return (self.q, *self.pool(), meta.block_tables, torch.tensor(meta.seq_lens, dtype=torch.int32))

    def expected(self, window: int | None = None) -> torch.Tensor:
        """Dense attention of each sequence's new tokens over all its tokens (or the last
        ``window`` of them), float64 (``[T, Hq, D]``)."""
        out, start = [], 0
        for keys, values, (cached, new) in zip(self.keys, self.values, self.seqs):
            out.append(dense_reference(self.q[start : start + new], keys, values, self.scale, cached, window))
            start += new
        return torch.cat(out)


def paged_batch(seqs, block_size, num_kv_heads, group, head_dim, seed=0, dtype=torch.float32) -> PagedBatch:
    """Random K/V and queries for ``seqs`` (``(cached, new)`` pairs), tables drawn without
    repetition from a shuffled pool with block 0 left out and two blocks to spare."""
    gen = torch.Generator().manual_seed(seed)
    counts = [math.ceil((cached + new) / block_size) for cached, new in seqs]
    num_blocks = 1 + sum(counts) + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for count in counts:
        tables.append(ids[:count])
        ids = ids[count:]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    keys = [randn(cached + new, num_kv_heads, head_dim) for cached, new in seqs]
    values = [randn(cached + new, num_kv_heads, head_dim) for cached, new in seqs]
    q = randn(sum(new for _, new in seqs), num_kv_heads * group, head_dim)
    return PagedBatch(seqs, tables, num_blocks, block_size, keys, values, q)


@st.composite
def paged_batches(draw, decode_only=False, dtype=torch.float32):
    """Sequences with some tokens cached and some new: prefills (0 cached), chunks, and
    decodes (1 new); with ``decode_only``, one new token per sequence."""
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([3, 5, 8, 12, 16]))
    seqs = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=4))
    seqs = [(cached, 1 if decode_only or (draw(st.booleans()) and cached) else new) for cached, new in seqs]
    return paged_batch(seqs, block_size, kv_heads, group, head_dim, draw(st.integers(0, 2**16)), dtype)
