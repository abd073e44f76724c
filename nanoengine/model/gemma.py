"""Gemma 3 (text): the Llama decoder with five changes, each a few lines here (lesson 16).

1. **Interleaved local and global attention.** ``config.layer_types`` marks each layer
   ``"sliding_attention"`` (a query sees the last ``sliding_window`` keys) or
   ``"full_attention"``; the 270M model has five local layers to each global one. The two
   kinds also rotate with different RoPE bases (10,000 local, 1,000,000 global).
2. **q/k norm**: each head of q and k is RMS-normalised before RoPE (as in Qwen3), and the
   scores are scaled by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``.
3. **Scaled embeddings**: looked-up rows are multiplied by ``sqrt(hidden_size)`` (rounded to
   the model's dtype, as transformers does); the tied head uses the unscaled matrix.
4. **Four norms a layer**: the attention and MLP outputs are normalised before they join
   the residual (``post_attention_layernorm``, ``post_feedforward_layernorm``) as well as
   their inputs; and every Gemma norm multiplies by ``1 + weight``, not ``weight``.
5. **GELU (tanh approximation)** instead of SiLU in the gated MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nanoengine.attention.base import AttentionContext
from nanoengine.model.layers.embedding import VocabEmbedding
from nanoengine.model.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from nanoengine.model.layers.norm import RMSNorm
from nanoengine.model.layers.rotary import RotaryEmbedding, rotate
from nanoengine.model.llama import LlamaForCausalLM, LlamaModel, MLPBuilder, RopeTables
from nanoengine.quant.base import QuantizationConfig, linear_method_for

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(RMSNorm):
    """``x / rms(x) * (1 + weight)``, all in float32, then rounded once (transformers' order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(VocabEmbedding):
    """Rows times ``sqrt(hidden_size)``, the factor rounded to the weight's dtype first."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__(vocab_size, hidden_size, dtype)
        self.register_buffer("scale", torch.tensor(hidden_size**0.5, dtype=dtype), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale


class LayerTypeRotary(nn.Module):
    """One RoPE table per layer type (each with its own base); ``lookup`` returns both, and
    each layer takes its own, so the tables are still indexed once per forward."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({
            kind: RotaryEmbedding(_config_with_rope(config, config.rope_parameters[kind]), head_dim, max_positions)
            for kind in (SLIDING, FULL)
        })

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, RopeTables]:
        return {kind: table.lookup(positions, dtype) for kind, table in self.tables.items()}


def _config_with_rope(config: PretrainedConfig, rope: dict) -> PretrainedConfig:
    """A copy of ``config`` whose RoPE settings are one layer type's (transformers' RoPE
    functions read them from a config)."""
    copy = config.__class__.from_dict(config.to_dict())
    copy.rope_parameters = dict(rope)
    return copy


class Gemma3Attention(nn.Module):
    """q/k/v, per-head q/k norm, RoPE of this layer's type, attention (windowed on local
    layers), output projection."""

    def __init__(
        self, config: PretrainedConfig, layer_idx: int, cache_idx: int, dtype: torch.dtype,
        quant_config: QuantizationConfig | None, prefix: str,
    ) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == SLIDING else None
        self.cache_idx = cache_idx
        self.head_dim = config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
            config.attention_bias, dtype, linear_method_for(quant_config, f"{prefix}.qkv_proj"),
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, config.attention_bias, dtype,
            linear_method_for(quant_config, f"{prefix}.o_proj"),
        )
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def forward(self, rope: dict[str, RopeTables], hidden: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rotate(self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim)), *rope[self.layer_type])
        k = rotate(self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim)), *rope[self.layer_type])
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.sliding_window is None:
            out = attn.attend(self.cache_idx, q, k, v, self.scale)
        else:
            out = attn.attend(self.cache_idx, q, k, v, self.scale, sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``, gate and up in one matmul."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {config.hidden_activation!r} is not supported by Gemma 3")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(
            config.hidden_size, [inter, inter], False, dtype, linear_method_for(quant_config, f"{prefix}.gate_up_proj")
        )
        self.down_proj = RowLinear(inter, config.hidden_size, False, dtype,
                                   linear_method_for(quant_config, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    """``h = x + post_attn_norm(attn(norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))``."""

    def __init__(
        self, config: PretrainedConfig, layer_idx: int, cache_idx: int, dtype: torch.dtype,
        quant_config: QuantizationConfig | None,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        eps = config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx, cache_idx, dtype, quant_config, f"{prefix}.self_attn")
        self.mlp = GemmaMLP(config, dtype, quant_config, f"{prefix}.mlp")
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)

    def forward(
        self, rope: dict[str, RopeTables], hidden: torch.Tensor, attn: AttentionContext, residual: None = None
    ) -> tuple[torch.Tensor, None]:
        """``LlamaDecoderLayer``'s signature; Gemma norms each sublayer's output before the add,
        so the stream goes whole from layer to layer (``residual`` is always None)."""
        hidden = hidden + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(hidden), attn))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden))), None


class Gemma3Model(LlamaModel):
    """The Llama stack (stages, forward) with Gemma's embedding, RoPE tables, layers and norm."""

    def make_embedding(self, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
        return ScaledEmbedding(config.vocab_size, config.hidden_size, dtype)

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> nn.Module:
        return LayerTypeRotary(config, config.head_dim, max_positions)

    def make_layer(
        self, config: PretrainedConfig, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool,
        quant_config: QuantizationConfig | None, cache_idx: int, build_mlp: MLPBuilder | None,
    ) -> nn.Module:
        return Gemma3DecoderLayer(config, layer_idx, cache_idx, dtype, quant_config)

    def make_norm(self, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
        return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's text model; logits soft-capped (``cap * tanh(logits / cap)``) when the config
    says so (Gemma 2 did; Gemma 3's released models do not).

    ``kv_sliding_window``: the window when *every* layer slides, so that the KV cache can give
    back the blocks before it (lesson 16); None when a global layer needs the whole sequence
    (Gemma 3's released models: their local layers keep every block too, as all layers share
    one block table here; vLLM's hybrid allocator gives each kind of layer its own).
    """

    model_class = Gemma3Model
    sliding_window_attention = True

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, max_positions: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        if getattr(config, "attn_logit_softcapping", None):
            raise ValueError("attn_logit_softcapping is not supported (Gemma 3's released models do not use it)")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention (an embedding variant of Gemma 3) is not supported")
        super().__init__(config, dtype, max_positions, quant_config)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        every_layer_slides = all(kind == SLIDING for kind in config.layer_types)
        self.kv_sliding_window = config.sliding_window if every_layer_slides else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
