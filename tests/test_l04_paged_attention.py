"""Lesson 04: PagedAttention in PyTorch equals dense attention, and paged generation equals
the contiguous cache (lesson 02) and the recompute loop (lesson 01)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.attention.registry import get_attention_backend
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache, paged_attention, write_kv
from nanoengine.engine.naive import NaiveEngine
from nanoengine.engine.inputs import Prompt
from nanoengine.sampling_params import SamplingParams
from tests.conftest import ZOO_NAMES
from tests.paged import BLOCK_SIZES, paged_batches

pytestmark = pytest.mark.l04


@pytest.mark.l04_t1
@given(num_blocks=st.integers(1, 6), block_size=st.sampled_from(BLOCK_SIZES), kv_heads=st.integers(1, 3),
       head_dim=st.sampled_from([1, 4, 12]), data=st.data())
def test_write_kv_stores_each_row_at_its_slot_and_nowhere_else(num_blocks, block_size, kv_heads, head_dim, data):
    """Slot ``s`` is offset ``s % block_size`` of block ``s // block_size`` (PagedKVCache's
    layout); the write lands in place, in the layer it was given."""
    slots = data.draw(st.permutations(range(num_blocks * block_size)))
    slots = slots[: data.draw(st.integers(1, len(slots)))]
    k, v = torch.randn(len(slots), kv_heads, head_dim), torch.randn(len(slots), kv_heads, head_dim)
    cache = PagedKVCache(2, num_blocks, block_size, kv_heads, head_dim, torch.float32)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    expected_k, expected_v = cache.k.clone(), cache.v.clone()
    for row, slot in enumerate(slots):
        block, offset = divmod(slot, block_size)
        expected_k[1, block, offset], expected_v[1, block, offset] = k[row], v[row]
    write_kv(cache.k[1], cache.v[1], k, v, torch.tensor(slots))
    torch.testing.assert_close(cache.k, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache.v, expected_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.l04_t2
@given(batch=paged_batches())
def test_each_sequence_attends_over_its_own_blocks(batch):
    """The reference backend on a pool and metadata written by hand (tests/paged.py): each
    sequence's queries see exactly its own cached and new tokens, causally."""
    out = paged_attention(batch.q, *batch.pool(), batch.metadata(), batch.scale)
    torch.testing.assert_close(out.double(), batch.expected(), rtol=1e-5, atol=1e-5)


@pytest.mark.l04_t3
@pytest.mark.parametrize("backend", ["torch", "torch_batched"])
@given(batch=paged_batches())
def test_a_step_through_built_metadata_equals_dense(backend, batch):
    """The whole step as the engine runs it: metadata from the block tables, the cached tokens
    written through it, then each layer's write and attention (PagedAttention.attend)."""
    cache = PagedKVCache(1, batch.num_blocks, batch.block_size, *batch.keys[0].shape[1:], torch.float32)
    cache.k[0], cache.v[0] = batch.empty_pool()
    for table, keys, values, (cached, _) in zip(batch.tables, batch.keys, batch.values, batch.seqs):
        if cached:
            meta = build_attention_metadata([table], [0], [cached], batch.block_size)
            write_kv(cache.k[0], cache.v[0], keys[:cached], values[:cached], meta.slot_mapping)
    meta = build_attention_metadata(batch.tables, [c for c, _ in batch.seqs], [n for _, n in batch.seqs],
                                    batch.block_size)
    out = PagedAttention(cache, meta, get_attention_backend(backend)).attend(0, batch.q, *batch.new_kv(), batch.scale)
    torch.testing.assert_close(out.double(), batch.expected(), rtol=1e-5, atol=1e-5)


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
