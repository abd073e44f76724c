"""Lesson 04: PagedAttention in plain PyTorch, the reference every faster kernel must equal.

The K/V of all requests live in one preallocated pool per layer, ``[num_blocks, block_size,
num_kv_heads, head_dim]``. Each step first scatters the new tokens' K/V into their slots,
then, for each sequence, gathers its blocks through its block table and runs ordinary causal
attention over them. The gather is a Python loop over sequences: easy to read, slow by
design; lesson 05's kernel and lesson 15's fast path replace it behind the same interface.
"""

from __future__ import annotations

import math

import torch

from nanoengine.attention.dense import causal_attention
from nanoengine.attention.metadata import AttentionMetadata
from nanoengine.attention.sliding_window import sliding_window_attention


class PagedKVCache:
    """The KV pool's tensors, owned by the worker (the cache manager only hands out ids).

    Invariant: slot ``s`` of layer ``l`` is ``k[l].view(-1, Hkv, D)[s]``; block ``b`` holds
    slots ``b * block_size .. (b + 1) * block_size - 1``.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # empty, not zeros: a slot is always written before it is read, and untouched pages of
        # a large pool then cost no RAM until used.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks, every layer, K and V: ``(source, destination)`` pairs
        (copy-on-write, lesson 08). All reads happen before any write."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's K/V (``[T, Hkv, D]``) of one layer at their slots."""
    # BEGIN SOLUTION L04.T1
    num_kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
    # END SOLUTION


def attend_sequence(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, i: int,
    scale: float, out: torch.Tensor,
) -> None:
    """Sequence ``i``'s query rows attend over its cached K/V, read through its block table."""
    # BEGIN SOLUTION L04.T2
    start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
    seq_len = metadata.seq_lens[i]
    blocks = metadata.block_tables[i, : math.ceil(seq_len / metadata.block_size)]
    k = k_cache[blocks].flatten(0, 1)[:seq_len]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    out[start:end] = causal_attention(q[start:end], k, v, scale, q_offset=seq_len - (end - start))
    # END SOLUTION


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query row over its own sequence's cached K/V (``[T, Hq, D]``)."""
    out = torch.empty_like(q)
    for i in range(metadata.num_seqs):
        attend_sequence(q, k_cache, v_cache, metadata, i, scale, out)
    return out


class PagedAttention:
    """The :class:`~nanoengine.attention.AttentionContext` of one step over a paged cache.

    ``attention_fn`` is the backend that reads the cache (see ``attention.registry``); the
    write into the slots is the same for every backend.
    """

    def __init__(self, kv_cache: PagedKVCache, metadata: AttentionMetadata, attention_fn=None) -> None:
        self.kv_cache = kv_cache
        self.metadata = metadata
        self.attention_fn = attention_fn or paged_attention

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        write_kv(k_cache, v_cache, k, v, self.metadata.slot_mapping)
        if sliding_window is not None:
            return sliding_window_attention(q, k_cache, v_cache, self.metadata, scale, sliding_window)
        return self.attention_fn(q, k_cache, v_cache, self.metadata, scale)
