"""Attention backends: where a layer's K/V go and how q reads them.

A model never owns its KV cache. Each forward receives an :class:`AttentionContext` that,
for every layer, stores the step's new K/V wherever this backend keeps them and returns the
attention output. Lesson 01 recomputes everything (:class:`NoCache`), lesson 02 keeps a
contiguous per-request cache, lesson 04 pages it through block tables.
"""

from nanoengine.attention.base import AttentionContext
from nanoengine.attention.contiguous import ContiguousKVCache
from nanoengine.attention.dense import NoCache, causal_attention

__all__ = ["AttentionContext", "ContiguousKVCache", "NoCache", "causal_attention"]
