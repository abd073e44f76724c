"""Pooling: ``[T, H]`` hidden states of a flat batch -> ``[B, H]``, one vector per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(hidden: torch.Tensor, query_start_loc: list[int], pooling_type: str, normalize: bool) -> torch.Tensor:
    """Sequence ``i`` is rows ``query_start_loc[i] : query_start_loc[i+1]`` of ``hidden``; its
    vector is the mean of its rows (``"MEAN"``), its first row (``"CLS"``) or its last
    (``"LAST"``), in float32, then scaled to unit length if ``normalize``."""
    # BEGIN SOLUTION L16.T4
    starts = torch.tensor(query_start_loc[:-1], device=hidden.device)
    ends = torch.tensor(query_start_loc[1:], device=hidden.device)
    hidden = hidden.float()
    if pooling_type == "CLS":
        pooled = hidden[starts]
    elif pooling_type == "LAST":
        pooled = hidden[ends - 1]
    elif pooling_type == "MEAN":
        sequence_of_row = torch.repeat_interleave(torch.arange(len(starts), device=hidden.device), ends - starts)
        sums = torch.zeros(len(starts), hidden.shape[1], device=hidden.device).index_add_(0, sequence_of_row, hidden)
        pooled = sums / (ends - starts)[:, None]
    else:
        raise ValueError(f"unknown pooling_type {pooling_type!r}")
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
    # END SOLUTION
