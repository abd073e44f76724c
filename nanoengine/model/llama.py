"""The Llama family (Llama 2/3, Mistral, SmolLM): a pre-norm decoder with GQA, RoPE and SwiGLU.

The model computes over a *flat* batch: ``input_ids`` and ``positions`` are ``[T]`` and may
hold tokens of several requests, because where each token's K/V live and which keys it may
see is the business of the :class:`~nanoengine.attention.AttentionContext` passed in. So the
same model serves the naive loop, the contiguous cache and the paged engine.

Architectural variants are class constants of the causal LM (``qkv_bias``, ``qk_norm``),
so Qwen2 and Qwen3 are subclasses of a few lines in ``qwen.py``.

Built for a parallel layout (lesson 12), every layer holds its tensor-parallel share, and a
pipeline stage holds only its range of decoder layers: the first stage also the embedding
and the head, the last the final norm. A stage receives the previous stage's hidden states
and sends its own on; the last sends the normed result back to the first, which samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nanoengine.attention.base import AttentionContext
from nanoengine.model.layers.embedding import LMHead, VocabEmbedding
from nanoengine.model.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from nanoengine.model.layers.norm import RMSNorm
from nanoengine.model.layers.rotary import RotaryEmbedding, rotate
from nanoengine.parallel.state import current_layout, split_evenly
from nanoengine.quant.base import QuantizationConfig, linear_method_for

if TYPE_CHECKING:
    from nanoengine.model.gguf_file import GGUFBlocks

# (cos, sin) of every token's position, [T, 1, head_dim]: looked up once per forward.
RopeTables = tuple[torch.Tensor, torch.Tensor]
# Builds a decoder layer's MLP: (config, layer index, dtype, quantization, parameter prefix).
MLPBuilder = Callable[[PretrainedConfig, int, torch.dtype, "QuantizationConfig | None", str], nn.Module]


def head_dim_of(config: PretrainedConfig) -> int:
    """Per-head size: explicit in newer configs (Qwen3), else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k RMSNorm, RoPE, attention, output projection.

    ``layer_idx`` is the layer's place in this rank's KV cache (its stage's layers only);
    ``num_heads`` and ``num_kv_heads`` are this rank's heads.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        dtype: torch.dtype,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads, qkv_bias,
            dtype, linear_method_for(quant_config, f"{prefix}.qkv_proj"),
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, o_bias, dtype,
            linear_method_for(quant_config, f"{prefix}.o_proj"),
        )
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.qk_norm = qk_norm

    def forward(self, rope: RopeTables, hidden: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.q_size, self.kv_size
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, q_size : q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = rotate(q, *rope), rotate(k, *rope)
        else:
            # q and k sit side by side in the fused output: rotate all their heads in one go.
            qk = rotate(qkv[:, : q_size + kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = attn.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up in one matmul.
    ``intermediate_size`` overrides the config's (a Qwen2-MoE shared expert has its own)."""

    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        intermediate_size: int | None = None,
    ) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported by the Llama family")
        bias = getattr(config, "mlp_bias", False)
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(
            config.hidden_size, [inter, inter], bias, dtype, linear_method_for(quant_config, f"{prefix}.gate_up_proj")
        )
        self.down_proj = RowLinear(
            inter, config.hidden_size, bias, dtype, linear_method_for(quant_config, f"{prefix}.down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """``h = x + attn(norm(x)); out = h + mlp(norm(h))``, with each residual add done by the
    norm after it (lesson 17): the layer takes the previous layer's MLP output and the residual
    stream apart, ``(x, residual)``, and returns the same pair, so the add that ends one layer
    fuses into the next layer's first norm (vLLM's layers carry the residual the same way).
    The first layer gets ``residual=None``: its input is the stream.

    ``layer_idx`` names the checkpoint's layer; ``cache_idx`` is its place in this rank's KV
    cache (the same, unless a pipeline stage holds a later range of layers).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        dtype: torch.dtype,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
        cache_idx: int | None = None,
        build_mlp: MLPBuilder | None = None,
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        o_bias = getattr(config, "attention_bias", False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(
            config, layer_idx if cache_idx is None else cache_idx, dtype, qkv_bias, o_bias, qk_norm, quant_config,
            f"{prefix}.self_attn",
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (build_mlp or dense_mlp)(config, layer_idx, dtype, quant_config, f"{prefix}.mlp")

    def forward(
        self, rope: RopeTables, hidden: torch.Tensor, attn: AttentionContext, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(rope, hidden, attn)
        hidden, residual = self.post_attention_layernorm.add_norm(hidden, residual)
        return self.mlp(hidden), residual


def dense_mlp(
    config: PretrainedConfig, layer_idx: int, dtype: torch.dtype, quant_config: QuantizationConfig | None, prefix: str
) -> nn.Module:
    """Every layer's MLP in the dense Llama family (a mixture-of-experts model builds its own)."""
    return LlamaMLP(config, dtype, quant_config, prefix)


class RemoteLayer(nn.Module):
    """A placeholder for a layer another pipeline stage holds: no weights, never run."""


class LlamaModel(nn.Module):
    """Embedding, the decoder stack and the final norm (HF's ``model.*`` parameters).

    Invariant: ``layers`` has every decoder layer's slot; the stage's own (``local_layers``,
    ``first_layer`` onwards) are real, the others :class:`RemoteLayer`. ``embed_tokens`` is
    None except on the first stage, ``norm`` except on the last.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype,
        max_positions: int,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None = None,
        build_mlp: MLPBuilder | None = None,
    ) -> None:
        super().__init__()
        self.pp = current_layout().pp
        if self.pp.size > config.num_hidden_layers:
            raise ValueError(f"pipeline_parallel_size ({self.pp.size}) must be at most the number of layers "
                             f"({config.num_hidden_layers}): every stage needs one")
        self.hidden_size, self.dtype = config.hidden_size, dtype
        mine = split_evenly(config.num_hidden_layers, self.pp.size, self.pp.rank)
        self.first_layer, self.num_local_layers = mine.start, len(mine)
        self.embed_tokens = self.make_embedding(config, dtype) if self.pp.is_first else None
        self.rotary = self.make_rotary(config, max_positions)
        self.layers = nn.ModuleList(
            self.make_layer(config, i, dtype, qkv_bias, qk_norm, quant_config, i - mine.start, build_mlp)
            if i in mine else RemoteLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = self.make_norm(config, dtype) if self.pp.is_last else None
        # Lesson 15's fast path may set a FusedDecode here: decode steps then run as one call.
        self.fused_decode: Callable[..., torch.Tensor] | None = None

    # The parts a related architecture swaps (Gemma 3: a scaled embedding, two RoPE tables, its
    # own layer and norm); the stage bookkeeping above stays the same.
    def make_embedding(self, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
        return VocabEmbedding(config.vocab_size, config.hidden_size, dtype)

    def make_rotary(self, config: PretrainedConfig, max_positions: int) -> nn.Module:
        return RotaryEmbedding(config, head_dim_of(config), max_positions)

    def make_layer(
        self, config: PretrainedConfig, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool,
        quant_config: QuantizationConfig | None, cache_idx: int, build_mlp: MLPBuilder | None,
    ) -> nn.Module:
        return LlamaDecoderLayer(config, layer_idx, dtype, qkv_bias, qk_norm, quant_config, cache_idx, build_mlp)

    def make_norm(self, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    @property
    def local_layers(self) -> nn.ModuleList:
        return self.layers[self.first_layer : self.first_layer + self.num_local_layers]

    def holds(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` (``model.*``) belongs to this stage."""
        if name.startswith("model.layers."):
            return not isinstance(self.layers[int(name.split(".")[2])], RemoteLayer)
        if name.startswith("model.embed_tokens."):
            return self.embed_tokens is not None
        if name.startswith("model.norm."):
            return self.norm is not None
        return True

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext, num_layers: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``num_layers``: run only the first layers (an early-exit draft, lesson 10).
        ``inputs_embeds``: the first layer's input, given instead of looked up (a multimodal
        model puts image features at its image tokens' rows, lesson 16).
        On a later pipeline stage the result is only passed on (the first stage samples)."""
        if inputs_embeds is not None:
            hidden = inputs_embeds
        elif self.pp.is_first:
            hidden = self.embed_tokens(input_ids)
        else:
            hidden = self.pp.recv((input_ids.shape[0], self.hidden_size), self.dtype, input_ids.device, self.pp.rank - 1)
        fused = self.fused_decode
        if fused is not None and inputs_embeds is None and num_layers is None and fused.runs(attn, hidden.shape[0]):
            return fused(hidden, positions, attn)
        rope = self.rotary.lookup(positions, hidden.dtype)
        residual = None
        for layer in self.local_layers[:num_layers]:
            hidden, residual = layer(rope, hidden, attn, residual)
        if self.pp.size == 1:
            return self.norm(hidden) if residual is None else self.norm.add_norm(hidden, residual)[0]
        return self._pass_on(hidden if residual is None else hidden + residual)

    def _pass_on(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pipeline's hand-offs of the whole stream: on to the next stage, and the last
        stage's normed output back to the first."""
        if self.pp.is_last:
            hidden = self.norm(hidden)
        self.pp.send(hidden, (self.pp.rank + 1) % self.pp.size)
        if self.pp.is_first:
            return self.pp.recv(tuple(hidden.shape), hidden.dtype, hidden.device, self.pp.size - 1)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A causal LM over a flat batch of tokens.

    ``forward(input_ids [T], positions [T], attn) -> hidden [T, hidden_size]``;
    ``compute_logits(hidden [N, hidden_size]) -> float32 [N, vocab]``, called only on the
    rows whose next token is wanted (the last of each sequence), which saves the largest
    matmul for every other token.
    """

    # None: read config.attention_bias; a bool forces q/k/v bias on or off.
    qkv_bias: bool | None = None
    qk_norm: bool = False
    # each decoder layer's MLP (a mixture-of-experts model builds a router and experts)
    build_mlp: MLPBuilder = staticmethod(dense_mlp)
    model_class: type[LlamaModel] = LlamaModel
    # checkpoint name -> (our fused parameter, shard id)
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "0"),
        "up_proj": ("gate_up_proj", "1"),
    }

    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias if self.qkv_bias is not None else getattr(config, "attention_bias", False)
        self.model = self.model_class(config, dtype, max_positions, qkv_bias, self.qk_norm, quant_config, self.build_mlp)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        # The head sits with the embedding, on the first pipeline stage, which samples.
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, tied) if self.model.pp.is_first else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext, num_layers: int | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn, num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | GGUFBlocks]]) -> None:
        """Fill every parameter from checkpoint tensors named as in Hugging Face (a GGUF file run
        natively sends its quantized tensors as blocks, which the layers' loaders keep).

        Strict both ways: an unknown checkpoint name or a parameter left unloaded raises,
        naming them, so a wrong mapping can never pass silently.
        """
        params = dict(self.named_parameters())
        # A fused parameter is complete only when every one of its shards has arrived.
        expected = {
            (name, shard)
            for name in params
            for shard in _shards_of(self.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
        }
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            if not (self.model.holds(name) if name.startswith("model.") else self.lm_head is not None):
                continue  # another pipeline stage's
            target, shard = self.checkpoint_target(name)
            if target is None:
                continue  # an expert another tensor-parallel rank holds
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
            module = self.get_submodule(target.rsplit(".", 1)[0])
            if hasattr(module, "weight_loader"):
                module.weight_loader(params[target], tensor, shard)
            else:
                _copy_param(params[target], tensor, name)
            loaded.add((target, shard))
        missing = sorted(f"{name}[{shard}]" if shard else name for name, shard in expected - loaded)
        if missing:
            raise ValueError(f"the checkpoint has no tensors for {missing[:8]}{' …' if len(missing) > 8 else ''}")

    def checkpoint_target(self, name: str) -> tuple[str | None, object]:
        """Which parameter (and shard of it) the checkpoint tensor ``name`` fills; a fused
        layer's parts map to one parameter. ``(None, None)``: this rank holds no part of it."""
        for ckpt_part, (fused, shard_id) in self.stacked_params.items():
            if f".{ckpt_part}." in name:
                return name.replace(f".{ckpt_part}.", f".{fused}."), shard_id
        return name, None


def _shards_of(module: nn.Module, param_name: str) -> Iterable[object]:
    """The shards a parameter is loaded in: a fused layer's ``shard_offsets`` (a layer whose
    parameters differ in their shards says per parameter, with ``shards_of``), else the whole."""
    if hasattr(module, "shards_of"):
        return module.shards_of(param_name)
    return getattr(module, "shard_offsets", {None: None})


def _copy_param(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)
