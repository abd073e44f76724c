"""Rotary position embedding (RoPE): positions enter attention as rotations of q and k.

The cos/sin tables are computed once, in float32, for every position up to the model's
length, then indexed by each token's position, so a batch may mix tokens of any positions
(a prefill chunk beside decode tokens of other requests). Scaled variants (linear, llama3,
yarn) only change the inverse frequencies, which transformers' own functions compute from
the HF config; the rotation itself is the same.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Types whose frequencies change with the sequence length at run time: not supported yet.
_DYNAMIC_ROPE = {"dynamic", "longrope"}


def rope_parameters(config: PretrainedConfig) -> dict:
    """The config's RoPE settings as one dict (transformers 5 calls it ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    return {"rope_type": "default", "rope_theta": 10000.0, **params}


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds ``theta**(-2i/d)`` and the cos/sin scale factor."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"rope_type {rope_type!r} changes with sequence length and is not supported")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](config)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions (the "rotate half" layout of Llama in HF).

    Invariant: ``cos`` and ``sin`` have shape ``[max_positions, head_dim]`` in float32.
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scale = inverse_frequencies(config, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of each token's position, ``[T, 1, head_dim]`` in ``dtype``: looked up
        once per forward and shared by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``: ``[T, Hq, D]``, ``k``: ``[T, Hkv, D]``, ``positions``: ``[T]``."""
        cos, sin = self.lookup(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head of ``x`` (``[T, H, D]``) by its token's angles (``[T, 1, D]``)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
