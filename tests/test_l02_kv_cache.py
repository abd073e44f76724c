"""Lesson 02: the KV cache: memory arithmetic, cached attention, and the cached decode loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.attention import ContiguousKVCache, causal_attention
from nanoengine.cache.contiguous import contiguous_requests_that_fit, kv_bytes_per_token
from nanoengine.config import ModelConfig
from nanoengine.engine.llm_engine import kv_bytes_per_slot
from nanoengine.engine.naive import kv_cache_decode, recompute_decode
from nanoengine.model import load_model
from nanoengine.model.llama import head_dim_of
from tests.conftest import ZOO_NAMES

pytestmark = pytest.mark.l02


@pytest.mark.l02_t1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(layers=st.integers(1, 6), kv_heads=st.integers(1, 4), head_dim=st.integers(1, 40), tokens=st.integers(1, 50))
def test_bytes_per_token_matches_the_cache_tensors(dtype, layers, kv_heads, head_dim, tokens):
    cache = ContiguousKVCache(layers, tokens, kv_heads, head_dim, dtype)
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, torch.finfo(dtype).bits // 8)
    assert per_token * tokens == cache.nbytes


@pytest.mark.l02_t1
def test_smollm2_bytes_per_token():
    assert kv_bytes_per_token(30, 3, 64, 2) == 23_040
    assert contiguous_requests_that_fit(2**30, 23_040, 8192) == 5


@pytest.mark.l02_t1
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_bytes_per_token_is_what_the_engines_pool_takes_per_slot(name, dtype, zoo_paths):
    """The engine sizes its paged pool by measuring one slot of it; the formula must predict it."""
    loaded = load_model(ModelConfig(model=str(zoo_paths[name]), dtype=dtype))
    config = loaded.hf_config
    per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config),
                                   loaded.dtype.itemsize)
    assert per_token == kv_bytes_per_slot(loaded)


def _dense_reference(q, k, v, scale):
    """Attention written the obvious way, in float64, one query head at a time."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for h in range(num_heads):
        scores = (q[:, h].double() @ k[:, h // group].double().T) * scale
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, h // group].double()
    return out


@st.composite
def attention_case(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([1, 3, 8, 12, 16]))
    length = draw(st.integers(1, 24))
    chunks, left = [], length
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    return kv_heads, group, head_dim, chunks, draw(st.integers(0, 2**16))


@pytest.mark.l02_t2
@given(case=attention_case())
def test_cached_attention_in_chunks_equals_dense(case):
    kv_heads, group, head_dim, chunks, seed = case
    length = sum(chunks)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, kv_heads * group, head_dim, generator=g)
    k = torch.randn(length, kv_heads, head_dim, generator=g)
    v = torch.randn(length, kv_heads, head_dim, generator=g)
    scale = head_dim**-0.5
    cache = ContiguousKVCache(2, length, kv_heads, head_dim, torch.float32)
    outs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        cache.attend(0, q[sl], k[sl], v[sl], scale)  # layer 0 must not disturb layer 1
        outs.append(cache.attend(1, q[sl], k[sl], v[sl], scale))
        cache.commit(size)
        start += size
    expected = _dense_reference(q, k, v, scale)
    torch.testing.assert_close(torch.cat(outs).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_attention(q, k, v, scale).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.l02_t2
def test_cache_refuses_to_overflow():
    cache = ContiguousKVCache(1, 4, 1, 2, torch.float32)
    x = torch.zeros(5, 1, 2)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        cache.attend(0, x, x, x, 1.0)


@pytest.mark.l02_t3
@pytest.mark.parametrize("name", ZOO_NAMES)
@given(prompt=st.lists(st.integers(0, 319), min_size=1, max_size=40), num_tokens=st.integers(1, 24),
       temperature=st.sampled_from([0.0, 0.8]))
def test_cached_loop_equals_recompute_loop(name, prompt, num_tokens, temperature, ours):
    loaded = ours(name)
    config = loaded.hf_config

    def sampler():
        g = torch.Generator().manual_seed(7)
        if temperature == 0:
            return lambda logits: int(logits.argmax())
        return lambda logits: int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=g))

    cache = ContiguousKVCache(config.num_hidden_layers, len(prompt) + num_tokens, config.num_key_value_heads,
                              head_dim_of(config), torch.float32)
    cached = list(itertools.islice(kv_cache_decode(loaded.model, prompt, sampler(), cache), num_tokens))
    naive = list(itertools.islice(recompute_decode(loaded.model, prompt, sampler()), num_tokens))
    assert cached == naive, f"first divergence at {next(i for i, (a, b) in enumerate(zip(cached, naive)) if a != b)}"
    assert cache.num_tokens == len(prompt) + num_tokens - 1
