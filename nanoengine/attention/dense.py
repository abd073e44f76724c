"""Dense attention over whole sequences: the math every other backend must reproduce.

Causal for decoders (a query sees the keys up to its own position), bidirectional for
encoders (every key of its sequence). ``NoCache`` runs one sequence, ``PackedSequences``
several side by side in one flat batch (embedding models, lesson 16): neither keeps K/V.
"""

from __future__ import annotations

import torch


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int = 0, window: int | None = None
) -> torch.Tensor:
    """Softmax attention of T queries over S keys of one sequence, with grouped KV heads.

    ``q``: ``[T, Hq, D]``; ``k``, ``v``: ``[S, Hkv, D]`` with ``Hq`` a multiple of ``Hkv``
    (each KV head serves ``Hq // Hkv`` query heads). Query ``i`` sits at position
    ``q_offset + i`` and sees keys ``0 .. q_offset + i``; with a sliding ``window`` (lesson 16),
    only the last ``window`` of them, ``q_offset + i - window + 1 .. q_offset + i``. Scores and
    softmax run in float32, as Hugging Face's eager attention does, then the result returns to
    q's dtype.
    """
    num_tokens, num_keys = q.shape[0], k.shape[0]
    hidden = None
    if num_tokens > 1 or q_offset + 1 < num_keys or (window is not None and num_keys > window):
        query_pos = torch.arange(num_tokens, device=q.device)[:, None] + q_offset
        key_pos = torch.arange(num_keys, device=q.device)[None, :]
        hidden = key_pos > query_pos
        if window is not None:
            hidden |= key_pos <= query_pos - window
    return _attention(q, k, v, scale, hidden)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Every query sees every key of its sequence: an encoder's attention (BERT, lesson 16)."""
    return _attention(q, k, v, scale, None)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, hidden: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` with the ``[T, S]`` positions where ``hidden`` is True left out."""
    num_tokens, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # [Hkv, group*T, D]: the query heads that share a KV head are stacked, so one batched
    # matmul per KV head serves them all without copying K or V.
    qg = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_tokens, head_dim)
    scores = torch.bmm(qg, k.permute(1, 2, 0)).float() * scale  # [Hkv, group*T, S]
    scores = scores.view(num_kv_heads, group, num_tokens, num_keys)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(num_kv_heads, group * num_tokens, num_keys)
    out = torch.bmm(probs, v.transpose(0, 1))  # [Hkv, group*T, D]
    return out.view(num_kv_heads, group, num_tokens, head_dim).permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)


class NoCache:
    """Lesson 01's backend: nothing is kept, so each forward must carry the whole sequence.

    Every step recomputes K and V of every earlier token: the cost the KV cache removes.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        return causal_attention(q, k, v, scale, window=sliding_window)


class PackedSequences:
    """Whole sequences side by side in one flat batch, nothing cached (lesson 16's embedding
    runs): rows ``query_start_loc[i] : query_start_loc[i+1]`` are sequence ``i``, and each
    token attends only within its own sequence, causally or (``causal=False``, an encoder)
    to all of it."""

    def __init__(self, query_start_loc: list[int], causal: bool) -> None:
        self.query_start_loc = query_start_loc
        self.causal = causal

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for start, end in zip(self.query_start_loc, self.query_start_loc[1:]):
            rows = slice(start, end)
            if self.causal:
                out[rows] = causal_attention(q[rows], k[rows], v[rows], scale, window=sliding_window)
            else:
                out[rows] = bidirectional_attention(q[rows], k[rows], v[rows], scale)
        return out
