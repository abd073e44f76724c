"""Lesson 04: PagedAttention in PyTorch equals dense attention, and paged generation equals
the contiguous cache (lesson 02) and the recompute loop (lesson 01)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.attention.registry import get_attention_backend
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache, write_kv
from nanoengine.engine.naive import NaiveEngine
from nanoengine.engine.inputs import Prompt
from nanoengine.sampling_params import SamplingParams
from tests.conftest import ZOO_NAMES

pytestmark = pytest.mark.l04

BLOCK_SIZES = [1, 2, 3, 4, 8, 16]


def dense_reference(q, k, v, scale, q_offset):
    """One sequence, float64, one query head at a time: the obvious way."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    query_pos = torch.arange(num_tokens)[:, None] + q_offset
    future = torch.arange(k.shape[0])[None, :] > query_pos
    for h in range(num_heads):
        scores = (q[:, h].double() @ k[:, h // group].double().T) * scale
        out[:, h] = scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, h // group].double()
    return out


@st.composite
def mixed_batches(draw):
    """Sequences with some tokens cached and some new: prefills (0 cached), chunks, decodes (1 new)."""
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([3, 5, 8, 12, 16]))
    seqs = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=4))
    seqs = [(cached, 1 if draw(st.booleans()) and cached else new) for cached, new in seqs]
    return block_size, kv_heads, group, head_dim, seqs, draw(st.integers(0, 2**16))


@pytest.mark.l04_t1
@pytest.mark.l04_t2
@pytest.mark.l04_t3
@pytest.mark.parametrize("backend", ["torch", "torch_batched"])
@given(batch=mixed_batches())
def test_paged_attention_equals_dense(backend, batch):
    block_size, kv_heads, group, head_dim, seqs, seed = batch
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in seqs) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()  # tables point all over the pool
    tables, used = [], 0
    for cached, new in seqs:
        count = math.ceil((cached + new) / block_size)
        tables.append(order[used : used + count])
        used += count
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, head_dim, torch.float32)
    cache.k.fill_(float("nan"))  # a backend that reads a slot it does not own fails loudly
    cache.v.fill_(float("nan"))
    past = [(torch.randn(c, kv_heads, head_dim, generator=g), torch.randn(c, kv_heads, head_dim, generator=g)) for c, _ in seqs]
    for table, (cached, _), (k, v) in zip(tables, seqs, past):
        if cached:
            meta = build_attention_metadata([table], [0], [cached], block_size)
            write_kv(cache.k[0], cache.v[0], k, v, meta.slot_mapping)
    total = sum(n for _, n in seqs)
    q = torch.randn(total, kv_heads * group, head_dim, generator=g)
    k = torch.randn(total, kv_heads, head_dim, generator=g)
    v = torch.randn(total, kv_heads, head_dim, generator=g)
    meta = build_attention_metadata(tables, [c for c, _ in seqs], [n for _, n in seqs], block_size)
    scale = head_dim**-0.5
    out = PagedAttention(cache, meta, get_attention_backend(backend)).attend(0, q, k, v, scale)
    start = 0
    for (cached, new), (pk, pv) in zip(seqs, past):
        rows = slice(start, start + new)
        expected = dense_reference(q[rows], torch.cat([pk, k[rows]]), torch.cat([pv, v[rows]]), scale, cached)
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-5, atol=1e-5)
        start += new


@pytest.mark.l04_t3
def test_metadata_of_a_mixed_step():
    meta = build_attention_metadata([[3, 1], [0], [2, 5]], [0, 2, 5], [5, 1, 2], block_size=4)
    assert meta.query_start_loc == [0, 5, 6, 8]
    assert meta.seq_lens == [5, 3, 7]
    assert meta.slot_mapping.tolist() == [12, 13, 14, 15, 4, 2, 21, 22]
    assert meta.block_tables.tolist() == [[3, 1], [0, 0], [2, 5]]
    assert meta.max_query_len == 5


def _run(loaded, kv_cache, prompt, params, block_size=16):
    engine = NaiveEngine(loaded, kv_cache=kv_cache, block_size=block_size)
    engine.add_request("r", Prompt(None, list(prompt)), params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs[-1].outputs[0].token_ids, engine


@pytest.mark.parametrize("name", ZOO_NAMES)
@given(prompt=st.lists(st.integers(0, 319), min_size=1, max_size=40), num_tokens=st.integers(1, 30),
       block_size=st.sampled_from(BLOCK_SIZES), seed=st.sampled_from([None, 3]))
def test_paged_generation_equals_contiguous_and_recompute(name, prompt, num_tokens, block_size, seed, ours):
    loaded = ours(name)
    params = SamplingParams(temperature=0.0 if seed is None else 0.9, seed=seed, max_tokens=num_tokens,
                            min_tokens=num_tokens)
    paged, engine = _run(loaded, "paged", prompt, params, block_size)
    assert paged == _run(loaded, "contiguous", prompt, params)[0]
    assert paged == _run(loaded, "none", prompt, params)[0]
    assert engine.manager.num_free_blocks == engine.manager.pool.num_blocks, "a finished request kept blocks"


def test_paged_loop_frees_blocks_when_abandoned(ours):
    from nanoengine.cache.kv_cache_manager import KVCacheManager
    from nanoengine.engine.naive import paged_decode
    from nanoengine.model.llama import head_dim_of

    loaded = ours("llama-gqa")
    config = loaded.hf_config
    manager = KVCacheManager(8, 4)
    cache = PagedKVCache(config.num_hidden_layers, 8, 4, config.num_key_value_heads, head_dim_of(config), torch.float32)
    stream = paged_decode(loaded.model, [1, 2, 3, 4, 5], lambda logits: int(logits.argmax()), manager, cache)
    list(itertools.islice(stream, 6))
    assert manager.num_free_blocks == 8 - 3
    stream.close()
    assert manager.num_free_blocks == 8
