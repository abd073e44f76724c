"""A faster PagedAttention in PyTorch: every decode row of a step in one batched matmul.

The reference (``torch_paged``) loops over sequences in Python, in every layer, so a step
costs more for every sequence in the batch, which hides what continuous batching gains.
Here all single-token (decode) queries are served together: their blocks are gathered into
one ``[B, max_len, Hkv, D]`` tensor, scores beyond each sequence's length are masked, and
one softmax and two batched matmuls do the rest. Rows of prefill chunks go through the
reference's per-sequence code. Tested against ``torch_paged.paged_attention``.
"""

from __future__ import annotations

import math

import torch

from nanoengine.attention.metadata import AttentionMetadata
from nanoengine.attention.torch_paged import attend_sequence


def batched_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``q``: ``[B, Hq, D]``, one query per sequence at its last position; returns ``[B, Hq, D]``."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = math.ceil(int(seq_lens.max()) / block_size)
    tables = block_tables[:, :max_blocks]
    # [B, Hkv, L, D] with L = max_blocks * block_size; the padding blocks are masked below.
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(2, 3)).float() * scale  # [B, Hkv, group, L]
    beyond = torch.arange(k.shape[2], device=q.device)[None, :] >= seq_lens[:, None]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    # Slots past a sequence's end may never have been written (the pool is torch.empty):
    # zero them, since a zero probability times a NaN is still NaN.
    v = v.masked_fill(beyond[:, None, :, None], 0)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(num_seqs, num_heads, head_dim)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference's signature and result; decode rows batched, prefill rows per sequence."""
    starts = metadata.query_start_loc
    decode = [i for i in range(metadata.num_seqs) if starts[i + 1] - starts[i] == 1]
    out = torch.empty_like(q)
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        seq_lens = torch.tensor([metadata.seq_lens[i] for i in decode], device=q.device)
        tables = metadata.block_tables[torch.tensor(decode, device=q.device)]
        out[rows] = batched_decode_attention(q[rows], k_cache, v_cache, tables, seq_lens, scale)
    for i in sorted(set(range(metadata.num_seqs)) - set(decode)):
        attend_sequence(q, k_cache, v_cache, metadata, i, scale, out)
    return out
