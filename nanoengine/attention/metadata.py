"""Lesson 04: what attention needs to know about a flattened batch.

A step's tokens from every scheduled sequence are concatenated into one ``[T]`` batch with
no padding: a prefill chunk of one request may sit beside single decode tokens of others.
``AttentionMetadata`` says where each sequence's queries are in that batch, how long each
sequence is, where its K/V blocks are, and in which slot each new token's K/V goes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nanoengine.cache.kv_cache_manager import slot_for


@dataclasses.dataclass(slots=True)
class AttentionMetadata:
    """The flattened batch's layout, as tensors for kernels and lists for Python loops.

    Invariants: sequence ``i``'s queries are rows ``query_start_loc[i] : query_start_loc[i+1]``
    of the batch; they are its last ``query_len`` tokens, at positions
    ``seq_lens[i] - query_len .. seq_lens[i] - 1``; ``slot_mapping[t]`` is the K/V slot of
    batch row ``t``; row ``i`` of ``block_tables`` holds sequence ``i``'s blocks, padded with 0.
    """

    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:]))


def build_attention_metadata(
    block_tables: Sequence[Sequence[int]],
    num_computed_tokens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a step in which sequence ``i`` adds ``num_new_tokens[i]`` tokens after
    ``num_computed_tokens[i]`` already cached ones (a prefill chunk, or 1 for decode)."""
    # BEGIN SOLUTION L04.T3
    query_start_loc = [0]
    slots = []
    for table, computed, new in zip(block_tables, num_computed_tokens, num_new_tokens):
        query_start_loc.append(query_start_loc[-1] + new)
        slots.extend(slot_for(table, pos, block_size) for pos in range(computed, computed + new))
    seq_lens = [c + n for c, n in zip(num_computed_tokens, num_new_tokens)]
    width = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    # END SOLUTION
    return AttentionMetadata(
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
    )
