"""Lesson 16: sliding-window attention over the paged cache (Gemma 3's local layers, Mistral).

A layer with window ``W`` lets the query at position ``p`` see only keys ``p - W + 1 .. p``.
Over a paged cache that has a second payoff beyond the saved compute: the blocks wholly
before the window are never read again, so a request's memory for such layers can stay
bounded by the window (see ``KVCacheManager``). This function holds up its end of that
bargain: it reads a sequence's block table from the first block the window reaches, never
the entries before it, which may already belong to another request.
"""

from __future__ import annotations

import math

import torch

from nanoengine.attention.dense import causal_attention
from nanoengine.attention.metadata import AttentionMetadata


def sliding_window_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
    window: int,
) -> torch.Tensor:
    """``paged_attention``'s contract, each query seeing only the last ``window`` keys.
    Decode rows (one query each) are served together by :func:`windowed_decode_attention`;
    each prefill chunk by the per-sequence code below."""
    out = torch.empty_like(q)
    block_size = metadata.block_size
    starts = metadata.query_start_loc
    decode = [i for i in range(metadata.num_seqs) if starts[i + 1] - starts[i] == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        out[rows] = windowed_decode_attention(
            q[rows], k_cache, v_cache, metadata.block_tables[torch.tensor(decode, device=q.device)],
            torch.tensor([metadata.seq_lens[i] for i in decode], device=q.device), scale, window,
        )
    for i in sorted(set(range(metadata.num_seqs)) - set(decode)):
        start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
        seq_len = metadata.seq_lens[i]
        # BEGIN SOLUTION L16.T3
        first_query = seq_len - (end - start)
        first_block = max(0, first_query - window + 1) // block_size  # the first block any query sees
        blocks = metadata.block_tables[i, first_block : math.ceil(seq_len / block_size)]
        base = first_block * block_size  # the position of the first key gathered
        k = k_cache[blocks].flatten(0, 1)[: seq_len - base]
        v = v_cache[blocks].flatten(0, 1)[: seq_len - base]
        out[start:end] = causal_attention(q[start:end], k, v, scale, q_offset=first_query - base, window=window)
        # END SOLUTION
    return out


def windowed_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, window: int,
) -> torch.Tensor:
    """``q``: ``[B, Hq, D]``, one query per sequence at its last position; returns ``[B, Hq, D]``.

    Every sequence reads the same number of blocks, ``ceil(window / block_size) + 1`` from
    the first one its window reaches, gathered into one ``[B, L, Hkv, D]`` tensor; keys
    outside the window (or past the sequence, or behind table padding) are masked. So a
    batch of decodes costs a few large operations, whatever its size, and never reads a
    block before the window.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    span = math.ceil(window / block_size) + 1
    first_block = (seq_lens - window).clamp(min=0) // block_size  # [B]
    columns = first_block[:, None] + torch.arange(span, device=q.device)[None, :]  # [B, span]
    blocks = block_tables.gather(1, columns.clamp(max=block_tables.shape[1] - 1))
    blocks = torch.where(columns < block_tables.shape[1], blocks, 0).clamp(min=0)  # masked below whatever they are
    k = k_cache[blocks].flatten(1, 2).transpose(1, 2)  # [B, Hkv, span*block_size, D]
    v = v_cache[blocks].flatten(1, 2).transpose(1, 2)
    key_pos = first_block[:, None] * block_size + torch.arange(span * block_size, device=q.device)[None, :]
    last = seq_lens[:, None] - 1
    outside = (key_pos > last) | (key_pos <= last - window)  # [B, L]
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(2, 3)).float() * scale  # [B, Hkv, group, L]
    scores = scores.masked_fill(outside[:, None, None, :], float("-inf"))
    v = v.masked_fill(outside[:, None, :, None], 0)  # unread slots may hold NaN
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(num_seqs, num_heads, head_dim)
