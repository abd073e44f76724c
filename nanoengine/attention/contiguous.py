"""Lesson 02's KV cache: one contiguous K and V buffer per layer for one request.

The buffers are sized for the longest the request may grow (prompt + max_tokens) when it
starts, so nothing is reallocated while it decodes; that reservation is what lesson 03's
paging removes. Kept in the package as the oracle that paged attention must equal.
"""

from __future__ import annotations

import torch

from nanoengine.attention.dense import causal_attention


class ContiguousKVCache:
    """K/V of one sequence, rows ``[0, num_tokens)`` filled.

    Invariant: for every layer, row ``p`` of ``k[layer]`` and ``v[layer]`` holds the key and
    value of the token at position ``p`` for every ``p < num_tokens``. A forward writes its
    T new tokens at rows ``num_tokens .. num_tokens+T-1`` of each layer; the caller then
    calls :meth:`commit` once, after all layers have run.
    """

    def __init__(
        self,
        num_layers: int,
        max_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, max_tokens, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.num_tokens = 0

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the K and V buffers."""
        return self.k.nbytes + self.v.nbytes

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Store this step's K/V for ``layer_idx`` and attend over the whole sequence so far."""
        # BEGIN SOLUTION L02.T2
        start = self.num_tokens
        end = start + q.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"the KV cache holds {self.max_tokens} tokens; this step needs {end}")
        self.k[layer_idx, start:end] = k
        self.v[layer_idx, start:end] = v
        return causal_attention(q, self.k[layer_idx, :end], self.v[layer_idx, :end], scale, q_offset=start)
        # END SOLUTION

    def commit(self, num_new_tokens: int) -> None:
        """Mark the tokens of the forward that just ran as cached."""
        self.num_tokens += num_new_tokens
