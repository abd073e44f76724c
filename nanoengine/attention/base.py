"""The one interface between a model's attention layers and wherever K/V live."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    """Passed explicitly to ``model.forward``; the model calls it once per layer.

    ``q``: ``[T, num_heads, head_dim]``; ``k`` and ``v``: ``[T, num_kv_heads, head_dim]`` for
    the T tokens of this forward (already rotated). Returns ``[T, num_heads, head_dim]``.
    A layer with a ``sliding_window`` (Gemma 3's local layers, lesson 16) passes it, and each
    query then sees only the last ``sliding_window`` keys; only contexts that implement that
    take the argument (lesson 02's contiguous cache does not, so the naive engine refuses
    such models).
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor: ...
