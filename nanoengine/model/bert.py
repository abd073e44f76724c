"""BERT, the encoder behind sentence-transformers' MiniLM (lesson 16: embedding models).

What changes from the decoders: every token sees every other token of its sequence
(no causal mask, and so no KV cache worth keeping: the whole input is one forward and
nothing is generated); positions are learned vectors added to the token embeddings (no
RoPE), plus a token-type vector (always type 0 here); each sublayer normalises *after*
joining the residual (post-norm, LayerNorm with a bias); GELU (exact) in a plain,
ungated MLP. The output is one hidden vector per token, which a pooler turns into one
vector per text (``nanoengine.pooling``).

Parameters keep the checkpoint's names (``encoder.layer.0.attention.self.query``), so
loading is a copy, checked both ways.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nanoengine.attention.base import AttentionContext
from nanoengine.quant.base import QuantizationConfig

# Checkpoint tensors with no part in an embedding: the classification pooler, and a
# buffer of position ids that older transformers saved.
_UNUSED = ("pooler.", "embeddings.position_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        token_type = self.token_type_embeddings.weight[0]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions) + token_type)


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)


class BertAttentionOutput(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class BertAttention(nn.Module):
    """``LayerNorm(x + dense(attention(x)))``, attention over the whole sequence."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self = BertSelfAttention(config, dtype)
        self.output = BertAttentionOutput(config, dtype)

    def forward(self, hidden: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        s = self.self
        shape = (hidden.shape[0], s.num_heads, s.head_dim)
        q, k, v = (proj(hidden).view(shape) for proj in (s.query, s.key, s.value))
        out = attn.attend(self.layer_idx, q, k, v, s.head_dim**-0.5)
        return self.output.LayerNorm(hidden + self.output.dense(out.reshape(hidden.shape)))


class BertDense(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features, dtype=dtype)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(out_features, eps=eps, dtype=dtype)


class BertLayer(nn.Module):
    """Attention, then ``LayerNorm(h + output(gelu(intermediate(h))))``."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = BertAttention(config, layer_idx, dtype)
        self.intermediate = BertDense(config.hidden_size, config.intermediate_size, dtype)
        self.output = BertDense(config.intermediate_size, config.hidden_size, dtype, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        hidden = self.attention(hidden, attn)
        mlp = self.output.dense(F.gelu(self.intermediate.dense(hidden)))
        return self.output.LayerNorm(hidden + mlp)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i, dtype) for i in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """``forward(input_ids [T], positions [T], attn) -> hidden [T, hidden_size]`` over a flat
    batch of sequences; ``attn`` must let each token see its whole sequence (bidirectional).
    """

    is_encoder = True  # attention is bidirectional: run it without a KV cache, never generate

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, max_positions: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized BERT encoders are not supported")
        if config.hidden_act != "gelu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported by BERT here (gelu is)")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype)
        self.encoder = BertEncoder(config, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            hidden = layer(hidden, attn)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every checkpoint tensor into the parameter of the same name (a ``bert.`` prefix,
        as a BertForMaskedLM checkpoint has, is dropped); strict both ways."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name.startswith(_UNUSED) or name.startswith("cls."):
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of BertModel")
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"the checkpoint has no tensors for {missing[:8]}{' …' if len(missing) > 8 else ''}")
