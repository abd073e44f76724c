"""Mixture-of-experts decoders (lesson 16): Mixtral and Qwen2-MoE.

Attention is the Llama family's; only the MLP changes. Each MoE layer holds a router (a
``[num_experts, hidden]`` matrix, whole on every rank) and :class:`FusedMoE` experts, split
by expert across tensor-parallel ranks. Qwen2-MoE adds a *shared expert*: a dense SwiGLU
that every token runs, scaled by a sigmoid gate of its own, and may keep some layers dense
(``mlp_only_layers``, ``decoder_sparse_step``).

Checkpoints store one matrix per expert (``experts.3.w1.weight``; Qwen2-MoE spells it
``experts.3.gate_proj.weight``); the loader stacks them into the fused parameters and skips
the experts another rank holds.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nanoengine.model.layers.moe import FusedMoE
from nanoengine.model.llama import LlamaForCausalLM, LlamaMLP
from nanoengine.quant.base import QuantizationConfig

# checkpoint expert matrix -> which part of the fused weights it fills
_EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_EXPERT_NAME = re.compile(r"^(?P<layer>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


class Router(nn.Module):
    """Scores every expert for every token: ``[T, hidden] -> [T, num_experts]`` logits."""

    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """``experts(x, router(x))``, plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``
    when ``shared_intermediate_size`` is given (Qwen2-MoE). Parameter names follow the
    checkpoints: ``gate`` is the router, ``experts`` the fused experts."""

    def __init__(
        self,
        config: PretrainedConfig,
        num_experts: int,
        intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype,
        shared_intermediate_size: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.gate = Router(config.hidden_size, num_experts, dtype)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size, intermediate_size,
                                renormalize, dtype)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = LlamaMLP(config, dtype, None, f"{prefix}.shared_expert", shared_intermediate_size)
            self.shared_expert_gate = Router(config.hidden_size, 1, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _refuse_quantization(quant_config: QuantizationConfig | None) -> None:
    if quant_config is not None:
        raise ValueError("quantized mixture-of-experts models are not supported: load the experts unquantized")


class MoEForCausalLM(LlamaForCausalLM):
    """Loading shared by the MoE decoders: per-expert checkpoint matrices into fused experts."""

    def checkpoint_target(self, name: str) -> tuple[str | None, object]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
        match = _EXPERT_NAME.match(name)
        if match is None:
            return super().checkpoint_target(name)
        part = _EXPERT_PARTS.get(match["part"])
        if part is None:
            raise ValueError(f"checkpoint tensor {name!r} is no expert matrix this model knows")
        experts: FusedMoE = self.get_submodule(match["layer"])
        expert = int(match["expert"])
        if expert >= experts.num_experts:
            raise ValueError(f"checkpoint tensor {name!r} names expert {expert}, but the model has {experts.num_experts}")
        if expert not in experts.expert_ids():
            return None, None
        return f"{match['layer']}.{'w2' if part == 'down' else 'w13'}", (expert, part)


def mixtral_mlp(
    config: PretrainedConfig, layer_idx: int, dtype: torch.dtype, quant_config: QuantizationConfig | None, prefix: str
) -> nn.Module:
    _refuse_quantization(quant_config)
    return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, True, dtype, prefix=prefix)


def qwen2_moe_mlp(
    config: PretrainedConfig, layer_idx: int, dtype: torch.dtype, quant_config: QuantizationConfig | None, prefix: str
) -> nn.Module:
    """A sparse layer unless ``mlp_only_layers`` lists it or ``decoder_sparse_step`` skips it."""
    _refuse_quantization(quant_config)
    sparse = (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
              and (layer_idx + 1) % config.decoder_sparse_step == 0)
    if not sparse:
        return LlamaMLP(config, dtype, None, prefix)
    return SparseMoeBlock(config, config.num_experts, config.moe_intermediate_size, config.norm_topk_prob, dtype,
                          config.shared_expert_intermediate_size, prefix)


class MixtralForCausalLM(MoEForCausalLM):
    build_mlp = staticmethod(mixtral_mlp)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    qkv_bias = True
    build_mlp = staticmethod(qwen2_moe_mlp)
