"""Lesson 15: every piece of the fast path equals the reference path it replaces.

- the numba CPU decode kernel, and the backend around it on mixed batches, equal dense
  attention (on pools written by hand, as lessons 04–05 test theirs), for float32 and
  bfloat16 caches;
- oneDNN-prepacked bf16 weights give what ``F.linear`` gives on the dense weights, bit for bit;
- the fused RMSNorm is bit-identical to Hugging Face's formula;
- a whole engine on the fast path generates what the reference engine generates.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM, SamplingParams
from nanoengine.attention.numba_cpu import decode_attention
from nanoengine.attention.registry import default_backend, get_attention_backend
from nanoengine.bench.roofline import MachineRates, decode_floors, matmul_params, probe_machine
from nanoengine.config import ModelConfig
from nanoengine.model import load_model
from nanoengine.model.layers.norm import RMSNorm
from nanoengine.model.layers.onednn import OneDNNPackedLinearMethod, onednn_packing_available, pack_linear_weights
from nanoengine.platform import keep_freed_memory_for_reuse
from tests.paged import dense_reference, paged_batches

pytestmark = pytest.mark.l15

numba_cpu = get_attention_backend("numba_cpu")
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


@pytest.mark.l15_t1
@pytest.mark.parametrize("dtype, tol", DTYPES)
@given(data=st.data())
def test_numba_cpu_decode_kernel_equals_dense(dtype, tol, data):
    """The kernel alone: one decode query per sequence, over a pool written by hand."""
    batch = data.draw(paged_batches(decode_only=True, dtype=dtype))
    out = decode_attention(*batch.decode_args(), batch.scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), batch.expected(), rtol=tol, atol=tol)


@pytest.mark.l15_t1
def test_numba_cpu_decode_reads_only_the_sequence():
    """A long block table padded with blocks of NaN: a pure decode step must not touch them."""
    k_cache, v_cache = (torch.full((6, 4, 1, 8), float("nan")) for _ in "kv")
    k, v = torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    for pos, (block, offset) in enumerate([(2, 0), (2, 1), (2, 2), (2, 3), (4, 0)]):
        k_cache[block, offset], v_cache[block, offset] = k[pos], v[pos]
    q = torch.randn(1, 2, 8)
    tables = torch.tensor([[2, 4, 5, 0, 1]], dtype=torch.int32)  # 2 blocks used, 3 padding
    out = decode_attention(q, k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32), 0.5)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, 0.5, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@given(data=st.data())
def test_numba_cpu_backend_equals_dense_on_mixed_batches(dtype, tol, data):
    """The backend as the engine calls it: decode rows through the kernel in one call,
    prefill chunks through the reference's per-sequence code."""
    batch = data.draw(paged_batches(dtype=dtype))
    out = numba_cpu(batch.q, *batch.pool(), batch.metadata(), batch.scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), batch.expected(), rtol=tol, atol=tol)


def test_the_fast_path_picks_the_numba_cpu_kernel_on_cpu_only():
    assert default_backend(torch.device("cpu"), fast_path=True) == "numba_cpu"
    assert default_backend(torch.device("cpu")) == "torch_batched"
    assert default_backend(torch.device("cuda"), fast_path=True) == "numba_cuda"


def test_rms_norm_is_bit_identical_to_hugging_face():
    norm = RMSNorm(64, 1e-6, torch.bfloat16)
    norm.weight.data = torch.randn(64).to(torch.bfloat16)
    x = (torch.randn(17, 64) * 5).to(torch.bfloat16)
    x32 = x.float()
    hf = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), hf)


needs_onednn = pytest.mark.skipif(
    not onednn_packing_available(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16 kernels here (this PyTorch has no oneDNN, or this CPU has no native bf16)"
)


# oneDNN packs bf16 only where the CPU has native bf16; elsewhere (an AVX2-only CPU) the packing
# task is checked in float32, where oneDNN's kernel and F.linear's (MKL) differ in rounding only.
PACK_DTYPE = torch.bfloat16 if onednn_packing_available(torch.bfloat16, torch.device("cpu")) else torch.float32


@pytest.mark.l15_t2
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_prepacked_weights_give_what_the_dense_weights_give(zoo_paths):
    config = ModelConfig(model=str(zoo_paths["llama-gqa"]), dtype=str(PACK_DTYPE).removeprefix("torch."))
    plain, packed = load_model(config), load_model(config)
    # 4 linear layers per decoder layer, plus the LM head
    assert pack_linear_weights(packed.model) == 4 * plain.hf_config.num_hidden_layers + 1
    methods = [m.linear_method for m in packed.model.modules() if hasattr(m, "linear_method")]
    assert len(methods) == 4 * plain.hf_config.num_hidden_layers + 1
    assert all(isinstance(m, OneDNNPackedLinearMethod) for m in methods)
    for rows in (1, 7):  # decode-sized and prefill-sized batches
        for (name, a), b in zip(plain.model.named_modules(), packed.model.modules()):
            if hasattr(a, "linear_method"):
                x = torch.randn(rows, a.weight.shape[1]).to(PACK_DTYPE)
                if PACK_DTYPE == torch.bfloat16:  # the same kernel runs: bit for bit
                    assert torch.equal(a(x), b(x)), name
                else:
                    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5, msg=name)


@needs_onednn
def test_loading_packs_the_weights_only_where_it_pays(zoo_paths):
    assert not onednn_packing_available(torch.float32, torch.device("cpu"))
    assert not onednn_packing_available(torch.bfloat16, torch.device("cuda"))
    path = str(zoo_paths["llama-gqa"])
    for dtype, packs in (("bfloat16", True), ("float32", False)):
        loaded = load_model(ModelConfig(model=path, dtype=dtype, fast_path=True))
        methods = [getattr(m, "linear_method", None) for m in loaded.model.modules()]
        assert any(isinstance(m, OneDNNPackedLinearMethod) for m in methods) == packs, dtype


def _engine(path: str, dtype: str, fast: bool) -> LLM:
    llm = LLM(path, dtype=dtype, fast_path=fast, max_num_seqs=8, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 22)
    assert (llm.llm_engine.runner.attention_fn is numba_cpu) == fast
    return llm


# A batch of mixed lengths that prefills in chunks (32-token steps) and decodes together.
PROMPTS = [{"prompt_token_ids": [(7 * i + j) % 90 + 3 for j in range(5 + 9 * i)]} for i in range(5)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_the_fast_engine_generates_what_the_reference_engine_generates(zoo_paths):
    """float32: the fast path changes the order of float additions only, so greedy tokens agree."""
    path = str(zoo_paths["llama-gqa"])
    fast, reference = (_engine(path, "float32", f).generate(PROMPTS, GREEDY, use_tqdm=False) for f in (True, False))
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in reference]


# bf16 rounds differently on the two paths (the kernel keeps scores in float32, the reference
# rounds them to bf16 as HF's eager attention does), and a random tiny model's next-token
# distribution is flat, so near-ties flip. The float32 reference must rank every token the
# bf16 fast path chose first, or within this many nats of its first (a wrong kernel misses
# by more than a nat).
BF16_NEAR_TIE = 0.25


def test_the_fast_engine_in_bfloat16_chooses_what_the_float32_reference_ranks_first(zoo_paths):
    path = str(zoo_paths["llama-gqa"])
    fast = _engine(path, "bfloat16", True).generate(PROMPTS, GREEDY, use_tqdm=False)
    reference = _engine(path, "float32", False)
    for prompt, out in zip(PROMPTS, fast):
        sequence = prompt["prompt_token_ids"] + list(out.outputs[0].token_ids)
        scored = reference.generate(
            {"prompt_token_ids": sequence}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False
        )[0].prompt_logprobs
        for position in range(len(prompt["prompt_token_ids"]), len(sequence)):
            entries = scored[position]
            best = max(e.logprob for e in entries.values())
            chosen = entries[sequence[position]]
            assert chosen.rank == 1 or best - chosen.logprob < BF16_NEAR_TIE, (position, chosen, best)


@pytest.mark.l15_t3
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen3-qknorm"])
def test_matmul_params_counts_every_weight_a_token_is_multiplied_by(ours, name):
    model = ours(name).model
    linear = sum(m.weight.numel() for m in model.modules() if hasattr(m, "linear_method"))
    assert matmul_params(model.config) == linear


@pytest.mark.l15_t3
def test_decode_floors_follow_from_the_rates(ours):
    config = ours("llama-gqa").model.config
    params = matmul_params(config)
    rates = MachineRates(copy_bytes_per_s=60e9, matmul_flops_per_s={"bfloat16": 700e9})
    floors = decode_floors(config, 2, rates, "bfloat16")
    assert floors["single_stream_tokens_per_s"] == pytest.approx(60e9 / (2 * params))
    assert floors["batched_tokens_per_s"] == pytest.approx(700e9 / (2 * params))
    probed = probe_machine(copy_mib=1, matmul_size=64, repeats=1)
    assert probed.copy_bytes_per_s > 0 and set(probed.matmul_flops_per_s) == {"float32", "bfloat16"}


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_allocator_settings():
    """mallopt refuses out-of-range values by returning 0: the thresholds must be ones it takes."""
    assert keep_freed_memory_for_reuse()
