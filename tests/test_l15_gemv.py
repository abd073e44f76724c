"""Lesson 15: the decode GEMV kernel equals the matmul it replaces, and is batch-invariant.

- ``matmul_rows`` equals a float64 matmul for float32, bf16 and int8 (with scales) weights,
  on any shape, including shapes that leave a partial tile;
- a row's result is bit-identical whatever rows come with it (the property the
  batch-invariant mode rests on);
- ``GemvLinearMethod`` sends few rows to the kernel and more to the method it wraps;
- GGUF's grouped int8 and 4-bit codes multiplied in place equal dequantizing them, in the C
  kernels (AVX2 and plain loops) and in numba's fallback, and a row's bits do not depend on
  the rows beside it;
- an engine whose decode matmuls run the kernel generates what the reference engine does.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM, SamplingParams
from nanoengine.model.fused_decode import FusedDecode
from nanoengine.model.layers.cpu_gemv import TILE, GemvLinearMethod, matmul_rows, use_gemv
from nanoengine.model.layers.linear import DECODE_MAX_ROWS, ColumnLinear, UnquantizedLinearMethod
from nanoengine.quant import grouped_gemv, native
from nanoengine.quant.gguf import GroupedInt8Weight
from nanoengine.quant.int4_kernel import Int4Weight, dequantize_int4
from nanoengine.quant.int8 import quantize_int8
from tests.oracles import SMOLLM2_PROMPTS, torch_quantize_blocks

pytestmark = pytest.mark.l15

WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.int8]


def reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out * scales.double() if scales is not None else out


def weight_of(dtype: torch.dtype, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    dense = torch.randn(n, k, generator=generator)
    if dtype == torch.int8:
        return quantize_int8(dense)
    return dense.to(dtype), None


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@given(rows=st.integers(1, 20), n=st.integers(1, 3 * TILE + 5), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_matmul_rows_equals_a_float64_matmul(dtype, rows, n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    weight, scales = weight_of(dtype, n, k, generator)
    x = torch.randn(rows, k, generator=generator)
    out = matmul_rows(x, weight, scales)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, scales), rtol=1e-4, atol=1e-4 * k)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(dtype):
    generator = torch.Generator().manual_seed(0)
    weight, scales = weight_of(dtype, 3 * TILE + 3, 576, generator)
    batch = torch.randn(37, 576, generator=generator)
    together = matmul_rows(batch, weight, scales)
    for i in (0, 5, 36):
        assert torch.equal(matmul_rows(batch[i : i + 1], weight, scales)[0], together[i])
    assert torch.equal(matmul_rows(batch[3:19], weight, scales), together[3:19])


def test_the_result_keeps_the_activations_dtype_and_leading_shape():
    weight = torch.randn(8, 16).bfloat16()
    x = torch.randn(2, 3, 16).bfloat16()
    out = matmul_rows(x, weight)
    assert out.shape == (2, 3, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (x.float() @ weight.float().T), rtol=2e-2, atol=2e-2)


class _Counting(UnquantizedLinearMethod):
    calls = 0

    def apply(self, layer, x, bias):  # noqa: ANN001, ANN201
        self.calls += 1
        return super().apply(layer, x, bias)


def test_few_rows_run_the_kernel_and_more_run_the_wrapped_method():
    layer = ColumnLinear(16, 8, True, torch.float32)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    inner = _Counting()
    layer.linear_method = GemvLinearMethod(inner, max_rows=4)
    for rows, calls in ((1, 0), (4, 0), (5, 1)):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
        assert inner.calls == calls
    layer.linear_method = GemvLinearMethod(inner, max_rows=None)  # every row count
    layer(torch.randn(100, 16))
    assert inner.calls == 1


def test_use_gemv_wraps_every_linear_layer_and_the_head(zoo_paths):
    fast = LLM(str(zoo_paths["llama-gqa"]), dtype="float32", fast_path=False, kv_cache_memory_bytes=2**20)
    model = fast.loaded.model
    layers = sum(1 for m in model.modules() if hasattr(m, "linear_method"))
    assert use_gemv(model) == layers
    assert all(isinstance(m.linear_method, GemvLinearMethod) for m in model.modules() if hasattr(m, "linear_method"))


def _count_fused_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time a decode step runs as one fused call."""
    fused_steps: list[int] = []
    original = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: fused_steps.append(1) or original(self, *a))
    return fused_steps


@pytest.mark.parametrize("quantization", [None, "int8", "int4", "w8a8"])
def test_an_engine_on_the_kernel_generates_what_the_reference_generates(zoo_paths, quantization, monkeypatch):
    """Greedy, float32, several requests of different lengths, so decode steps have 1 to 3
    rows and run fused; the same module by module (``enforce_eager``) and on the reference
    path. bfloat16 is held to the float32 reference by test_l15_fast_path's near-tie rule
    (the fused path keeps activations in float32, the module path rounds them)."""
    fused_steps = _count_fused_steps(monkeypatch)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 11, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs, fused_counts = {}, {}
    for fast_path, enforce_eager in ((False, False), (True, True), (True, False)):
        llm = LLM(str(zoo_paths["llama-gqa"]), dtype="float32", fast_path=fast_path, enforce_eager=enforce_eager,
                  quantization=quantization, kv_cache_memory_bytes=2**22)
        before = len(fused_steps)
        outputs[fast_path, enforce_eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        fused_counts[fast_path, enforce_eager] = len(fused_steps) - before
    assert outputs[True, False] == outputs[True, True] == outputs[False, False]
    assert fused_counts[False, False] == fused_counts[True, True] == 0
    assert fused_counts[True, False] >= 11  # every decode step after the prefill ran as one fused call


@pytest.mark.slow
def test_smollm2_fused_gives_the_tokens_of_enforce_eager(monkeypatch):
    """The bundled model in float32: the fused decode step and the module-by-module step
    choose the same 4 × 32 greedy tokens (int4's fused step: the engine test above)."""
    fused_steps = _count_fused_steps(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = {}
    for enforce_eager in (True, False):
        llm = LLM(dtype="float32", enforce_eager=enforce_eager, max_model_len=512, kv_cache_memory_bytes=2**25)
        outputs[enforce_eager] = [o.outputs[0].token_ids for o in llm.generate(SMOLLM2_PROMPTS, params, use_tqdm=False)]
    assert outputs[False] == outputs[True]
    assert len(fused_steps) >= 31


# GGUF's blocks on the fast path quantize a decode step's activations to int8 (W4A8, as
# llama.cpp does), so a decoded token's log-probability moves from the float reference's.
# Measured on the bundled Q4_1 file (4 prompts x 32 tokens): median 0.03 nats, at most 0.51.
# A wrong kernel (a scale or a min left out, a group misread) moves them by several nats.
W4A8_MAX_NATS, W4A8_MEDIAN_NATS = 1.0, 0.1


@pytest.mark.slow
def test_smollm2_on_its_gguf_blocks_decodes_with_the_float_references_log_probabilities(monkeypatch):
    """The bundled Q4_1 file, native, fused (W4A8 in the C kernels) and module by module: the
    log-probability of each token it decodes, against the reference path's for the same
    sequence (float activations, the same blocks dequantized)."""
    fused_steps = _count_fused_steps(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    reference = LLM(quantization="gguf", fast_path=False, dtype="float32", max_model_len=512,
                    kv_cache_memory_bytes=2**25, enable_prefix_caching=False)
    prompts = [reference.get_tokenizer()(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    for enforce_eager in (False, True):
        llm = LLM(quantization="gguf", dtype="float32", enforce_eager=enforce_eager, max_model_len=512,
                  kv_cache_memory_bytes=2**25)
        differences = []
        for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                     use_tqdm=False)):
            tokens = list(out.outputs[0].token_ids)
            scored = reference.generate({"prompt_token_ids": prompt + tokens},
                                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
            for i, token in enumerate(tokens[1:], start=1):  # the first token comes from the prefill
                ours, theirs = out.outputs[0].logprobs[i][token].logprob, scored.prompt_logprobs[len(prompt) + i][token]
                differences.append(abs(ours - theirs.logprob))
        differences.sort()
        assert differences[-1] < W4A8_MAX_NATS and differences[len(differences) // 2] < W4A8_MEDIAN_NATS, (
            enforce_eager, differences[-1], differences[len(differences) // 2])
    assert len(fused_steps) >= 31


@pytest.mark.parametrize("mins", [True, False])
@given(rows=st.integers(1, 5), n=st.integers(1, 40), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_grouped_int8_codes_multiply_in_place_as_dequantized(mins, rows, n, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    k = 32 * groups
    codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=generator)
    shift = torch.randn(n, groups, generator=generator) if mins else None
    weight = GroupedInt8Weight(codes, scales, shift, 32, torch.float32)
    x = torch.randn(rows, k, generator=generator)
    dense = codes.double().view(n, groups, 32) * scales.double()[..., None]
    if mins:
        dense += shift.double()[..., None]
    expected = x.double() @ dense.view(n, k).T
    torch.testing.assert_close(weight(x).double(), expected, rtol=1e-4, atol=1e-3)


@given(rows=st.integers(1, 5), n=st.integers(1, 40), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_int4_codes_multiply_in_place_as_dequantized(rows, n, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    k = 32 * groups
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales, mins = torch.rand(n, groups, generator=generator), torch.randn(n, groups, generator=generator)
    weight = Int4Weight(codes, scales, mins, 32, torch.float32)
    assert not weight.use_kernel  # float32 activations: the numba kernel's case
    x = torch.randn(rows, k, generator=generator)
    expected = x.double() @ dequantize_int4(codes, scales, mins, 32).double().T
    torch.testing.assert_close(weight(x).double(), expected, rtol=1e-4, atol=1e-3)
    many = torch.randn(DECODE_MAX_ROWS + 1, k, generator=generator)  # the dequantize-once path
    torch.testing.assert_close(weight(many).double(), many.double() @ dequantize_int4(codes, scales, mins, 32).double().T,
                               rtol=1e-4, atol=1e-3)


# The C kernels (where they build) and numba's fallback, which runs where no compiler is found.
INT4_KERNELS = {"C": grouped_gemv.int4_kernel, "numba": grouped_gemv._int4_kernel}
W4A8_KERNELS = {"C, int8 activations": grouped_gemv.w4a8_kernel, "numba, int8 activations": grouped_gemv._w4a8_kernel}
INT8_KERNELS = {"C": grouped_gemv.grouped_int8_kernel, "numba": grouped_gemv._int8_kernel}
INT8_INT8_KERNELS = {"C, int8 activations": grouped_gemv.grouped_int8_int8_kernel,
                     "numba, int8 activations": grouped_gemv._int8_int8_kernel}


def test_the_c_kernels_build_where_a_compiler_is_and_are_the_ones_used():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the numba kernels run")
    assert native.library() is not None
    assert grouped_gemv.int4_kernel is not grouped_gemv._int4_kernel
    assert grouped_gemv.w4a8_kernel is not grouped_gemv._w4a8_kernel
    assert grouped_gemv.grouped_int8_int8_kernel is not grouped_gemv._int8_int8_kernel
    assert grouped_gemv.grouped_int8_kernel is not grouped_gemv._int8_kernel


def grouped_oracle(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                   group_size: int, int8_activations: bool) -> torch.Tensor:
    """``Σ_g scale · (codes_g · x_g) + min · Σ x_g`` in float64, ``x_g`` the float activations or
    (``int8_activations``) their int8 codes times their scale per group, as W4A8 computes."""
    rows, (n, k) = x.shape[0], codes.shape
    groups = k // group_size
    if int8_activations:
        xq, xscale = torch_quantize_blocks(x, group_size)
        grouped_x = xq.double().view(rows, groups, group_size) * xscale.double()[..., None]
    else:
        grouped_x = x.double().view(rows, groups, group_size)
    dots = torch.einsum("mgj,ngj->mng", grouped_x, codes.double().view(n, groups, group_size))
    expected = (dots * scales.double()).sum(-1)
    if mins is not None:
        expected += x.double().view(rows, groups, group_size).sum(-1) @ mins.double().T
    return expected


@pytest.mark.parametrize("kernel", list(INT4_KERNELS) + list(W4A8_KERNELS))
@pytest.mark.parametrize("group_size", [8, 32, 64])  # 8: the C kernel's plain loop; 32, 64: AVX2
@given(rows=st.integers(1, DECODE_MAX_ROWS + 1), n=st.integers(1, 2 * grouped_gemv.TILE + 3),
       groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_int4_kernels_equal_their_oracle(kernel, group_size, rows, n, groups, seed):
    """Float activations (as dequantizing would give), and W4A8 (GGUF's 4-bit blocks at
    decode: activations quantized per group, each group's products summed in integers)."""
    generator = torch.Generator().manual_seed(seed)
    k = group_size * groups
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales, mins = torch.rand(n, groups, generator=generator), torch.randn(n, groups, generator=generator)
    nibbles = Int4Weight(codes, scales, mins, group_size, torch.float32).nibbles
    x = torch.randn(rows, k, generator=generator)
    out = np.empty((rows, n), np.float32)
    {**INT4_KERNELS, **W4A8_KERNELS}[kernel](x.numpy(), nibbles.numpy(), scales.numpy(), mins.numpy(), group_size, out)
    expected = grouped_oracle(x, codes, scales, mins, group_size, int8_activations=kernel in W4A8_KERNELS)
    torch.testing.assert_close(torch.from_numpy(out).double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", list(INT8_KERNELS) + list(INT8_INT8_KERNELS))
@pytest.mark.parametrize("group_size", [4, 16, 24, 32])  # 4: plain loops; 24: AVX2 with a tail of 8
@given(rows=st.integers(1, DECODE_MAX_ROWS + 1), n=st.integers(1, 2 * grouped_gemv.TILE + 3),
       groups=st.integers(1, 3), mins=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_int8_kernels_equal_their_oracle(kernel, group_size, rows, n, groups, mins, seed):
    generator = torch.Generator().manual_seed(seed)
    k = group_size * groups
    codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = torch.rand(n, groups, generator=generator)
    shift = torch.randn(n, groups, generator=generator) if mins else None
    weight = GroupedInt8Weight(codes, scales, shift, group_size, torch.float32)
    x = torch.randn(rows, k, generator=generator)
    out = np.empty((rows, n), np.float32)
    {**INT8_KERNELS, **INT8_INT8_KERNELS}[kernel](x.numpy(), weight.codes.numpy(), weight.scales.numpy(),
                                                  weight.mins.numpy() if mins else np.empty((0, 0), np.float32),
                                                  group_size, out)
    expected = grouped_oracle(x, codes, scales, shift, group_size, int8_activations=kernel in INT8_INT8_KERNELS)
    torch.testing.assert_close(torch.from_numpy(out).double(), expected, rtol=1e-5, atol=1e-4)


def test_the_c_kernels_give_a_row_the_same_bits_alone_and_in_a_batch():
    generator = torch.Generator().manual_seed(0)
    n, k = 37, 128
    codes, scales, mins = torch.randint(0, 16, (n, k), generator=generator), torch.rand(n, 4), torch.randn(n, 4)
    nibbles = Int4Weight(codes, scales, mins, 32, torch.float32).nibbles.numpy()
    grouped = GroupedInt8Weight(codes.to(torch.int8), scales, mins, 32, torch.float32)
    x = torch.randn(9, k, generator=generator).numpy()
    for run in (
        lambda rows, out: grouped_gemv.int4_kernel(rows, nibbles, scales.numpy(), mins.numpy(), 32, out),
        lambda rows, out: grouped_gemv.w4a8_kernel(rows, nibbles, scales.numpy(), mins.numpy(), 32, out),
        lambda rows, out: grouped_gemv.grouped_int8_kernel(rows, grouped.codes.numpy(), grouped.scales.numpy(),
                                                           grouped.mins.numpy(), 32, out),
        lambda rows, out: grouped_gemv.grouped_int8_int8_kernel(rows, grouped.codes.numpy(), grouped.scales.numpy(),
                                                                grouped.mins.numpy(), 32, out),
    ):
        batch, alone = np.empty((9, n), np.float32), np.empty((1, n), np.float32)
        run(x, batch)
        run(x[4:5].copy(), alone)
        assert np.array_equal(batch[4], alone[0])
