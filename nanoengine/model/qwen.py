"""Qwen2 and Qwen3: the Llama decoder with two switches.

Qwen2 always adds a bias to the q/k/v projections (not to o_proj). Qwen3 drops that bias
and instead RMS-normalises each head of q and k before RoPE (its ``head_dim`` is explicit
and need not equal hidden_size / heads).
"""

from __future__ import annotations

from nanoengine.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
