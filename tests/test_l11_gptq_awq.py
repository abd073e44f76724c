"""Lesson 11: GPTQ and AWQ checkpoints, read in their own packed layouts and run as int4.

Checked: GPTQ's int32 words unpack to the codes, zero points and scales packed into them
(task L11.T3); a GPTQ layer, with or without act order, computes ``x @ Wᵀ`` for the weight
its tensors decode to; GPTQ (in order and act order) and AWQ checkpoints written by
``tests/quant_checkpoints.py`` load and give the logits, and the greedy tokens, of the float
model they decode to, in less memory; and settings or tensors nanoengine cannot run are
refused naming what is wrong.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoengine import LLM, SamplingParams
from nanoengine.attention import NoCache
from nanoengine.config import ModelConfig
from nanoengine.model import load_model
from nanoengine.model.layers.linear import ColumnLinear, QKVLinear, UnquantizedLinearMethod
from nanoengine.quant.awq import AWQConfig, AWQLinearMethod
from nanoengine.quant.gptq import GPTQConfig, GPTQLinearMethod, unpack_gptq
from tests.quant_checkpoints import gptq_tensors, pack_along, write_quantized
from tests.zoo import build_model, build_tokenizer

pytestmark = pytest.mark.l11

GROUP_SIZE = 32
# name -> (zoo model, quantization_config, AWQ layers kept in float)
CHECKPOINTS = {
    "gptq": ("qwen2-bias", {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": False,
                            "sym": False, "checkpoint_format": "gptq", "lm_head": False}, ()),
    "gptq-act-order": ("llama-gqa", {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": True,
                                     "sym": False, "checkpoint_format": "gptq", "lm_head": False}, ()),
    "awq": ("qwen3-qknorm", {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
                             "version": "gemm", "modules_to_not_convert": ["layers.1.self_attn"]},
            ("layers.1.self_attn",)),
}
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]


@pytest.mark.l11_t3
@given(out_words=st.integers(1, 4), group_size=st.sampled_from([8, 16, 32]), groups=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_unpack_gptq_returns_what_was_packed(out_words, group_size, groups, seed):
    n, k = 8 * out_words, group_size * groups
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    stored_zeros = torch.randint(0, 16, (groups, n), generator=gen)  # v1: the zero point minus one
    scales = torch.rand(groups, n, generator=gen).half()

    got_codes, got_scales, got_mins = unpack_gptq(pack_along(codes.t(), dim=0), pack_along(stored_zeros, dim=1), scales)

    assert got_codes.dtype == torch.uint8 and got_codes.shape == (n, k)
    assert torch.equal(got_codes.long(), codes)
    torch.testing.assert_close(got_scales, scales.float().t(), rtol=0, atol=0)
    torch.testing.assert_close(got_mins, -(stored_zeros + 1).float().t() * scales.float().t(), rtol=0, atol=0)


def _gptq_layer(layer_class, *args, group_size, bias=False, **kwargs):
    return layer_class(*args, bias=bias, dtype=torch.float32, linear_method=GPTQLinearMethod(group_size), **kwargs)


def _load(layer, tensors, shard=None):
    params = dict(layer.named_parameters())
    for key, value in tensors.items():
        layer.weight_loader(params[key], value, shard)


@given(in_blocks=st.integers(1, 4), out_words=st.integers(1, 4), group_size=st.sampled_from([-1, 16, 32]),
       desc_act=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_gptq_layer_computes_with_the_weight_its_tensors_decode_to(in_blocks, out_words, group_size, desc_act, seed):
    """Both int4 paths: the kernel (32 inputs a group, outputs a multiple of 16) and dequantizing."""
    k, n = 32 * in_blocks, 8 * out_words
    torch.manual_seed(seed)
    weight, bias = torch.randn(n, k), torch.randn(n)
    tensors, decoded = gptq_tensors(weight, group_size, desc_act, seed)
    layer = _gptq_layer(ColumnLinear, k, n, group_size=group_size, bias=True)
    _load(layer, tensors)
    layer.bias.data.copy_(bias)
    layer.linear_method.process_weights_after_loading(layer)

    assert (layer.input_perm is not None) == (desc_act and group_size != -1 and k > group_size)
    x = torch.randn(3, 5, k)
    torch.testing.assert_close(layer(x), x @ decoded.t() + bias, rtol=1e-5, atol=1e-4)


def test_fused_shards_with_different_act_orders_are_refused():
    layer = _gptq_layer(QKVLinear, 64, 16, 2, 1, group_size=GROUP_SIZE)
    q, _ = gptq_tensors(torch.randn(32, 64), GROUP_SIZE, desc_act=True, seed=0)
    k, _ = gptq_tensors(torch.randn(16, 64), GROUP_SIZE, desc_act=True, seed=1)
    _load(layer, q, "q")
    with pytest.raises(ValueError, match="g_idx of shard 'k' differs"):
        _load(layer, k, "k")


@functools.cache
def _written(name: str, root: Path) -> tuple[Path, Path, torch.nn.Module]:
    zoo_name, quantization_config, keep_float = CHECKPOINTS[name]
    tokenizer = build_tokenizer()
    model = build_model(zoo_name, len(tokenizer))
    path = root / name
    oracle = write_quantized(model, tokenizer, path, quantization_config, keep_float)
    float_path = root / f"{name}-decoded"
    oracle.save_pretrained(float_path)
    tokenizer.save_pretrained(float_path)
    return path, float_path, oracle


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(name)``: (checkpoint dir, dir of the float model it decodes to, that model in memory)."""
    root = tmp_path_factory.mktemp("quant_checkpoints")
    return lambda name: _written(name, root)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_gives_the_logits_of_the_model_it_decodes_to(name, written):
    path, float_path, oracle = written(name)
    loaded = load_model(ModelConfig(model=str(path), dtype="float32"))
    quantization_config = CHECKPOINTS[name][1]
    assert loaded.quantization == quantization_config["quant_method"]
    down_proj = loaded.model.model.layers[0].mlp.down_proj
    assert (down_proj.input_perm is not None) == quantization_config.get("desc_act", False)
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), NoCache()))
        expected = oracle(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert loaded.weight_bytes < load_model(ModelConfig(model=str(float_path), dtype="float32")).weight_bytes


def test_awq_layers_named_in_modules_to_not_convert_stay_float(written):
    path, _, _ = written("awq")
    model = load_model(ModelConfig(model=str(path), dtype="float32")).model
    assert isinstance(model.model.layers[1].self_attn.qkv_proj.linear_method, UnquantizedLinearMethod)
    assert hasattr(model.model.layers[0].self_attn.qkv_proj, "int4")


def test_gptq_greedy_generation_matches_the_decoded_model(written):
    path, float_path, _ = written("gptq-act-order")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ours, decoded = (
        LLM(str(p), dtype="float32", enable_prefix_caching=False)
        .generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0].token_ids
        for p in (path, float_path)
    )
    assert ours == decoded


@pytest.mark.parametrize(
    "config_class, quantization_config, complaint",
    [
        (GPTQConfig, {"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
        (GPTQConfig, {"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
        (GPTQConfig, {"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "checkpoint_format"),
        (AWQConfig, {"quant_method": "awq", "bits": 4, "version": "gemv"}, "version='gemv'"),
        (AWQConfig, {"quant_method": "awq", "w_bit": 3, "q_group_size": 128}, "bits=3"),
        (AWQConfig, {"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point=False"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_field(config_class, quantization_config, complaint):
    with pytest.raises(ValueError, match=complaint):
        config_class.from_checkpoint_config(quantization_config)


def test_awq_cannot_keep_part_of_a_fused_layer_float():
    config = AWQConfig.from_checkpoint_config({"quant_method": "awq", "bits": 4, "modules_to_not_convert": ["k_proj"]})
    assert isinstance(config.linear_method("model.layers.0.self_attn.o_proj"), AWQLinearMethod)
    with pytest.raises(ValueError, match="k_proj.*fused layer"):
        config.linear_method("model.layers.0.self_attn.qkv_proj")


def test_another_quantization_cannot_apply_to_a_gptq_checkpoint(written):
    path, _, _ = written("gptq")
    with pytest.raises(ValueError, match="gptq-quantized"):
        LLM(str(path), dtype="float32", quantization="int8")
