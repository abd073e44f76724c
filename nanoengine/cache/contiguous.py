"""Lesson 02's memory arithmetic: what one token's K/V cost, and what reserving costs.

A contiguous cache (``nanoengine.attention.contiguous``) must reserve room for a request's
longest possible length before it starts, because a tensor cannot grow in place without a
copy. These functions count what that reservation costs; lesson 03 compares it with paging.
"""

from __future__ import annotations


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V one token occupies across all layers.

    2 (K and V) × layers × KV heads × head size × bytes per element. For SmolLM2-135M in
    bfloat16: 2 × 30 × 3 × 64 × 2 = 23,040 bytes.
    """
    # BEGIN SOLUTION L02.T1
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes
    # END SOLUTION


def contiguous_requests_that_fit(budget_bytes: int, bytes_per_token: int, reserved_tokens: int) -> int:
    """How many requests a KV budget holds when each reserves ``reserved_tokens`` up front."""
    if reserved_tokens < 1 or bytes_per_token < 1:
        raise ValueError("reserved_tokens and bytes_per_token must be positive")
    return budget_bytes // (bytes_per_token * reserved_tokens)
