"""The one interface between a model's attention layers and wherever K/V live."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    """Passed explicitly to ``model.forward``; the model calls it once per layer.

    ``q``: ``[T, num_heads, head_dim]``; ``k`` and ``v``: ``[T, num_kv_heads, head_dim]`` for
    the T tokens of this forward (already rotated). Returns ``[T, num_heads, head_dim]``.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor: ...
