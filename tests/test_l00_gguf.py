"""Lesson 00: the bundled GGUF (SmolLM2-135M-Instruct, Q4_1) loads exactly as transformers loads it.

Two oracles: the ``gguf`` package's own dequantization for every tensor type in the file, and
transformers' GGUF loader for names, shapes and the q/k un-permutation. Transformers' greedy
generation from the same file is lesson 06's oracle for the whole engine (test_l06_engine.py).
"""

from __future__ import annotations

import collections

import gguf
import numpy as np
import pytest
import torch

from nanoengine.model import gguf_file, resolve_model_path

pytestmark = [pytest.mark.l00, pytest.mark.slow]


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_model_path(None)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return gguf_file.open_gguf(gguf_path)


def test_every_tensor_type_dequantizes_like_the_gguf_package(reader):
    by_type = collections.defaultdict(list)
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name].append(tensor)
    assert {"Q4_1", "Q8_0", "F32"} <= set(by_type)
    for tensors in by_type.values():
        for tensor in tensors[:3]:
            ours = gguf_file.dequantize(tensor)
            theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            assert ours.shape == tuple(reversed([int(d) for d in tensor.shape]))
            np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float32).reshape(ours.shape))


def test_config_and_tensors_match_transformers_gguf_loader(gguf_path, reader):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = gguf_file.gguf_to_hf_config(reader)
    with torch.device("meta"):  # transformers maps names through a model's state dict
        skeleton = AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    expected_config = theirs["config"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(config, key) == expected_config[key], key
    assert config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == pytest.approx(100000.0)
    ours = dict(gguf_file.iter_gguf_weights(reader, config))
    expected = theirs["tensors"]
    assert set(ours) == set(expected)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        torch.testing.assert_close(ours[name], torch.as_tensor(np.asarray(expected[name])).float(), rtol=0, atol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    # llama.cpp's converter: per head, the two halves are interleaved into adjacent pairs
    permuted = weight.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(weight.shape)
    np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(permuted, 3), weight)


def test_unknown_gguf_tensor_is_named():
    with pytest.raises(ValueError, match="blk.0.attn_weird.weight"):
        gguf_file.hf_tensor_name("blk.0.attn_weird.weight")


def test_the_tokenizer_is_converted_once_then_read_back_the_same(gguf_path, tmp_path, monkeypatch):
    """The second load reads the saved conversion (converting again would fail here) and
    encodes, decodes and templates exactly as the conversion does."""
    from transformers import AutoTokenizer

    from nanoengine.model import tokenizer_cache

    monkeypatch.setenv(tokenizer_cache.CACHE_DIR_VARIABLE, str(tmp_path))
    converted = tokenizer_cache.gguf_tokenizer(gguf_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def no_second_conversion(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF's tokenizer was converted again"
        return from_pretrained(*args, **kwargs)

    from_pretrained = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_second_conversion)
    cached = tokenizer_cache.gguf_tokenizer(gguf_path)
    for text in ["Hello world", "Ünïcödé 東京 🚀\n\ndef f(x):\n    return x", "<|im_start|>user\nhi<|im_end|>"]:
        assert cached(text)["input_ids"] == converted(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi there"}]
    assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (cached.eos_token_id, cached.bos_token_id, cached.all_special_ids) == \
        (converted.eos_token_id, converted.bos_token_id, converted.all_special_ids)


def test_an_unwritable_cache_only_costs_the_conversion(gguf_path, tmp_path, monkeypatch):
    from nanoengine.model import tokenizer_cache

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv(tokenizer_cache.CACHE_DIR_VARIABLE, str(blocked))
    assert tokenizer_cache.gguf_tokenizer(gguf_path)("Hello")["input_ids"]
