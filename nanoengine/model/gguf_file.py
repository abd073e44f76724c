"""Reading a GGUF file: its metadata as a Hugging Face config, its tensors as HF-named weights.

GGUF (llama.cpp's format) stores the architecture's hyperparameters as ``{arch}.key``
metadata and tensors under llama.cpp's names, often quantized in blocks (Q4_1, Q8_0, Q4_K…).
We map the metadata to HF config fields ourselves (a short table per field), dequantize
every tensor with the ``gguf`` package, and rename it to its HF name, so the rest of
nanoengine sees the same model a safetensors directory would give.

One wrinkle: for the ``llama`` architecture, llama.cpp's converter permutes the rows of
``q_proj`` and ``k_proj`` (its RoPE pairs adjacent dimensions, HF's pairs the two halves);
:func:`unpermute_rope_rows` undoes it.

Run natively (``quantization="gguf"``, lesson 11), the block-quantized tensors are not
dequantized here: they come out as :class:`GGUFBlocks`, the file's bytes one matrix row per
row, and ``nanoengine.quant.gguf`` turns them into the weights the layers run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

# GGUF architecture -> (HF model_type, HF architecture)
_ARCHITECTURES = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# "{arch}.<key>" metadata -> HF config field
_CONFIG_FIELDS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
# Gemma 3's local layers rotate with a base llama.cpp does not store (it is fixed by the model).
_GEMMA3_LOCAL_ROPE_THETA = 10000.0

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma normalises each sublayer's output too, so its "ffn_norm" is the MLP's input norm.
_GEMMA3_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: gguf.GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    return arch


def gguf_to_hf_config(reader: gguf.GGUFReader) -> PretrainedConfig:
    """The HF config that the GGUF's metadata describes."""
    arch = gguf_architecture(reader)
    model_type, hf_arch = _ARCHITECTURES[arch]
    fields = {}
    for key, hf_name in _CONFIG_FIELDS.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            fields[hf_name] = value
    if "vocab_size" not in fields:
        fields["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if arch == "gemma3":
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_THETA}}
    tensor_names = {t.name for t in reader.tensors}
    return AutoConfig.for_model(
        model_type,
        architectures=[hf_arch],
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        **fields,
    )


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    block_tensors = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block_tensors:
        return f"model.layers.{parts[1]}.{block_tensors[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to nanoengine")


# Types kept as float even when a file runs natively: there is nothing to gain from blocks.
_FLOAT_TYPES = frozenset(
    {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
)


@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A block-quantized tensor as the file stores it, for running natively.

    ``data`` is uint8 ``[rows, bytes_per_row]``: row ``i`` holds the blocks of the matrix's
    row ``i``, because GGUF blocks run along the last (input) dimension; so permuting or
    slicing whole rows of the bytes does the same to the matrix. ``shape`` is the HF shape
    ``[rows, cols]``; ``name`` the GGUF name, for messages.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))


def dequantize(tensor: gguf.ReaderTensor, rows: int | None = None) -> np.ndarray:
    """A tensor's values (or its first ``rows`` rows) as float32, in HF's (row-major, reversed
    GGUF) shape."""
    shape = _hf_shape(tensor)
    data = tensor.data if rows is None else tensor.data[:rows]
    values = gguf.quants.dequantize(data, tensor.tensor_type)
    # np.array copies: unquantized tensors come back as read-only views of the memory map.
    return np.array(values, dtype=np.float32).reshape(shape if rows is None else (-1, *shape[1:]))


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved pairs back to two halves."""
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_weights(
    reader: gguf.GGUFReader, config: PretrainedConfig, native: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Every tensor under its HF name (q/k rows un-permuted for llama; Gemma's norms back to
    HF's ``1 + weight`` convention, as llama.cpp's converter stores ``1 + weight``),
    dequantized to float32; with ``native``, every block-quantized tensor comes as
    :class:`GGUFBlocks` instead."""
    arch = gguf_architecture(reader)
    permuted = arch == "llama"
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, arch)
        as_blocks = native and tensor.tensor_type not in _FLOAT_TYPES
        values = tensor.data if as_blocks else dequantize(tensor)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values - 1.0
        if permuted and name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rope_rows(values, config.num_attention_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rope_rows(values, config.num_key_value_heads)
        if as_blocks:
            yield name, GGUFBlocks(tensor.name, tensor.tensor_type, values, _hf_shape(tensor))
        else:
            yield name, torch.from_numpy(values)
