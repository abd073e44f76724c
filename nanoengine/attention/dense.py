"""Dense causal attention over one sequence: the math every other backend must reproduce."""

from __future__ import annotations

import torch


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int = 0
) -> torch.Tensor:
    """Softmax attention of T queries over S keys of one sequence, with grouped KV heads.

    ``q``: ``[T, Hq, D]``; ``k``, ``v``: ``[S, Hkv, D]`` with ``Hq`` a multiple of ``Hkv``
    (each KV head serves ``Hq // Hkv`` query heads). Query ``i`` sits at position
    ``q_offset + i`` and sees keys ``0 .. q_offset + i``. Scores and softmax run in float32,
    as Hugging Face's eager attention does, then the result returns to q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # [Hkv, group*T, D]: the query heads that share a KV head are stacked, so one batched
    # matmul per KV head serves them all without copying K or V.
    qg = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_tokens, head_dim)
    scores = torch.bmm(qg, k.permute(1, 2, 0)).float() * scale  # [Hkv, group*T, S]
    scores = scores.view(num_kv_heads, group, num_tokens, num_keys)
    if num_tokens > 1 or q_offset + 1 < num_keys:
        query_pos = torch.arange(num_tokens, device=q.device)[:, None] + q_offset
        key_pos = torch.arange(num_keys, device=q.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(num_kv_heads, group * num_tokens, num_keys)
    out = torch.bmm(probs, v.transpose(0, 1))  # [Hkv, group*T, D]
    return out.view(num_kv_heads, group, num_tokens, head_dim).permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)


class NoCache:
    """Lesson 01's backend: nothing is kept, so each forward must carry the whole sequence.

    Every step recomputes K and V of every earlier token: the cost the KV cache removes.
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return causal_attention(q, k, v, scale)
