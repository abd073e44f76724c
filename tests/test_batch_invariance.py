"""Batch-invariant mode (``LLM(..., batch_invariant=True)``): the same greedy request gives the
same tokens, and the same logprobs bit for bit, alone, inside a batch of up to 64 others,
with its prompt chunked, and with its prefix served from the cache.

Logprobs are compared exactly, not only tokens: the tiny models' logits are peaked, so a
rounding difference rarely changes a token, but it always shows in a logprob. Without the
mode the same comparisons fail (:func:`test_without_the_mode_the_same_request_drifts`), so
these tests can tell the mode from the default engine on any CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanoengine import LLM, SamplingParams
from nanoengine.attention import numba_cpu
from nanoengine.attention.metadata import AttentionMetadata
from nanoengine.config import ModelConfig
from nanoengine.model.batch_invariant import uncovered
from nanoengine.model.layers.cpu_gemv import GemvLinearMethod
from nanoengine.model.layers.moe import FusedMoE
from nanoengine.outputs import RequestOutput
from tests.paged import paged_batches

pytestmark = pytest.mark.l15

DTYPES = ["float32", "bfloat16"]
MODEL = "llama-gqa"
# 37 tokens: two full blocks of 16 (what a prefix-cache hit can share) and a partial one.
TARGET = {"prompt_token_ids": [(7 * i) % 250 + 3 for i in range(37)]}
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
MAX_OTHERS = 63


def completion(output: RequestOutput) -> tuple[list[int], list]:
    """What must not change: the tokens and every logprob the request asked for."""
    return output.outputs[0].token_ids, output.outputs[0].logprobs


@dataclasses.dataclass
class Engines:
    """Three engines over the same model: ``whole`` (a step takes whole prompts, no prefix
    cache), ``chunked`` (8 tokens a step) and ``cached`` (prefix caching on); ``alone`` is
    the target's completion on ``whole``, by itself, before anything else ran."""

    whole: LLM
    chunked: LLM
    cached: LLM
    alone: tuple[list[int], list]


@functools.cache
def _engines(path: Path, dtype: str, batch_invariant: bool) -> Engines:
    common = dict(dtype=dtype, batch_invariant=batch_invariant, kv_cache_memory_bytes=2**23)
    whole = LLM(str(path), enable_prefix_caching=False, max_num_seqs=MAX_OTHERS + 1, **common)
    chunked = LLM(str(path), enable_prefix_caching=False, max_num_batched_tokens=8, max_num_seqs=8, **common)
    cached = LLM(str(path), **common)
    alone = completion(whole.generate(TARGET, PARAMS, use_tqdm=False)[0])
    return Engines(whole, chunked, cached, alone)


@pytest.fixture
def engines(zoo_paths):
    """``engines(dtype, batch_invariant=True)``: the cached :class:`Engines` of the tiny Llama."""
    return lambda dtype, batch_invariant=True: _engines(zoo_paths[MODEL], dtype, batch_invariant)


def batch_of(others: list[tuple[int, int, float]], position: int, seed: int) -> tuple[list[dict], list[SamplingParams]]:
    """The target at ``position`` among ``others`` (prompt length, max tokens, temperature),
    with random prompts; a third of them start with the target's first block, so some steps
    also share its prefix."""
    rng = random.Random(seed)
    prompts, params = [], []
    for length, max_tokens, temperature in others:
        tokens = [rng.randrange(3, 250) for _ in range(length)]
        if rng.random() < 1 / 3:
            tokens = TARGET["prompt_token_ids"][:16] + tokens
        prompts.append({"prompt_token_ids": tokens})
        params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=rng.randrange(2**16)))
    position = min(position, len(others))
    return prompts[:position] + [TARGET] + prompts[position:], params[:position] + [PARAMS] + params[position:]


def in_batch(llm: LLM, others: list[tuple[int, int, float]], position: int, seed: int) -> tuple[list[int], list]:
    prompts, params = batch_of(others, position, seed)
    return completion(llm.generate(prompts, params, use_tqdm=False)[min(position, len(others))])


def chunked(engines: Engines) -> tuple[list[int], list]:
    return completion(engines.chunked.generate(TARGET, PARAMS, use_tqdm=False)[0])


def with_prefix_hit(engines: Engines) -> tuple[list[int], list]:
    """The target on the prefix-caching engine after a request that shares its two full
    blocks, so its prefill computes only the last 5 tokens."""
    llm = engines.cached
    llm.generate({"prompt_token_ids": TARGET["prompt_token_ids"][:32] + [9, 9, 9]}, PARAMS, use_tqdm=False)
    stats = llm.llm_engine.kv_cache_manager.stats
    hits = stats.hit_blocks
    result = completion(llm.generate(TARGET, PARAMS, use_tqdm=False)[0])
    assert stats.hit_blocks - hits == 2
    return result


FULL_BATCH = [(48, 16, 0.0)] * 21 + [(30, 4, 1.0)] * 21 + [(1, 1, 0.0)] * 21


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12)
@example(others=FULL_BATCH, position=31, seed=0)  # a batch of 64
@given(
    others=st.lists(st.tuples(st.integers(1, 48), st.integers(1, 16), st.sampled_from([0.0, 1.0])), max_size=MAX_OTHERS),
    position=st.integers(0, MAX_OTHERS),
    seed=st.integers(0, 2**16),
)
def test_the_same_request_gives_the_same_tokens_in_any_batch(engines, dtype, others, position, seed):
    """Other requests (greedy or sampled, prompts of 1 to 64 tokens, some sharing the target's
    first block) before and after the target in the same ``generate``: some steps chunk
    prompts to fit the step's budget, every decode step has a different number of rows."""
    mine = engines(dtype)
    assert in_batch(mine.whole, others, position, seed) == mine.alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_request_gives_the_same_tokens_chunked_and_from_the_prefix_cache(engines, dtype):
    mine = engines(dtype)
    assert chunked(mine) == mine.alone
    assert with_prefix_hit(mine) == mine.alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_the_mode_the_same_request_drifts(engines, dtype):
    """The mutation check: the default engine (lesson 15's fast path) fails at least one of
    the comparisons above on this CPU, so passing them says something about the mode."""
    default = engines(dtype, batch_invariant=False)
    drifted = [in_batch(default.whole, FULL_BATCH, 31, 0), chunked(default), with_prefix_hit(default)]
    assert any(result != default.alone for result in drifted)


def test_the_mode_runs_every_matmul_and_every_attention_row_on_the_per_row_kernels(engines):
    llm = engines("bfloat16").whole
    model = llm.loaded.model
    methods = [m.linear_method for m in model.modules() if hasattr(m, "linear_method")]
    assert len(methods) == 2 * 4 + 1  # two layers of q/k/v, o, gate/up, down; the head
    assert all(isinstance(m, GemvLinearMethod) and m.max_rows is None for m in methods)
    assert not any(hasattr(m, "packed_weight") for m in model.modules())  # no oneDNN prepacking
    assert model.model.fused_decode is None
    assert llm.llm_engine.runner.attention_fn is numba_cpu.batch_invariant_attention


def _one_row(metadata: AttentionMetadata, seq: int, row: int) -> AttentionMetadata:
    """Row ``row`` of sequence ``seq`` as a decode step of its own (its keys already written)."""
    end = metadata.query_start_loc[seq + 1]
    return AttentionMetadata(
        query_start_loc=[0, 1], seq_lens=[metadata.seq_lens[seq] - (end - row) + 1],
        block_tables=metadata.block_tables[seq : seq + 1], slot_mapping=metadata.slot_mapping[row : row + 1],
        block_size=metadata.block_size,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@given(data=st.data())
def test_batch_invariant_attention_equals_dense_and_each_row_alone(dtype, tol, data):
    """Over mixed steps (prefills, chunks after cached tokens, decodes): the reference's
    result, and every row bit-identical to that row attending by itself."""
    batch = data.draw(paged_batches(dtype=dtype))
    k_cache, v_cache = batch.pool()
    metadata = batch.metadata()
    out = numba_cpu.batch_invariant_attention(batch.q, k_cache, v_cache, metadata, batch.scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), batch.expected(), rtol=tol, atol=tol)
    for seq in range(metadata.num_seqs):
        for row in range(metadata.query_start_loc[seq], metadata.query_start_loc[seq + 1]):
            alone = numba_cpu.batch_invariant_attention(
                batch.q[row : row + 1], k_cache, v_cache, _one_row(metadata, seq, row), batch.scale)
            assert torch.equal(alone[0], out[row])


def test_what_the_mode_cannot_cover_is_refused(zoo_paths):
    with pytest.raises(ValueError, match="float32 or bfloat16 on the CPU"):
        ModelConfig(dtype="float16", batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant must be a bool"):
        ModelConfig(batch_invariant=1)
    with pytest.raises(ValueError, match="Int4"):
        LLM(str(zoo_paths[MODEL]), dtype="float32", batch_invariant=True, quantization="int4")
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(zoo_paths[MODEL]), dtype="float32", batch_invariant=True, enable_lora=True)
    experts = torch.nn.ModuleDict({"experts": FusedMoE(4, 2, 8, 16, True, torch.float32)})
    assert uncovered(experts) == ["experts (mixture of experts)"]


@pytest.mark.slow
def test_smollm2_in_bfloat16_gives_the_same_tokens_alone_batched_chunked_and_cached():
    """The bundled model, greedy, bf16: a 40-token prompt alone; beside three others with its
    first two blocks from the prefix cache; and alone in 16-token chunks."""
    from tests.oracles import SMOLLM2_PROMPTS

    target = " ".join(SMOLLM2_PROMPTS) + " Tell me more about each of these."
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    common = dict(dtype="bfloat16", batch_invariant=True, kv_cache_memory_bytes=2**25, max_model_len=256)
    llm = LLM(**common)
    assert len(llm.get_tokenizer()(target)["input_ids"]) >= 33  # two full blocks to share
    alone = completion(llm.generate(target, params, use_tqdm=False)[0])
    batched = llm.generate(SMOLLM2_PROMPTS[:2] + [target] + SMOLLM2_PROMPTS[2:], params, use_tqdm=False)
    assert llm.llm_engine.kv_cache_manager.stats.hit_blocks >= 2
    assert completion(batched[2]) == alone
    llm = LLM(max_num_batched_tokens=16, max_num_seqs=16, enable_prefix_caching=False, **common)
    assert completion(llm.generate(target, params, use_tqdm=False)[0]) == alone
