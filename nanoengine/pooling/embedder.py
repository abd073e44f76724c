"""Embedding runs: texts in, one vector each out (``LLM(task="embed").embed``, lesson 16).

Nothing is generated, so none of the engine's machinery is needed: no KV cache (every
token is computed once, in one forward), no scheduler (a request is one forward). The
prompts are packed into flat batches of up to ``max_num_batched_tokens`` tokens, each
sequence attending within itself (causally for a decoder, bidirectionally for an encoder),
and the pooler turns each sequence's hidden states into its vector.
"""

from __future__ import annotations

import torch

from nanoengine.attention.dense import PackedSequences
from nanoengine.model.loader import LoadedModel
from nanoengine.pooling.config import PoolerConfig, default_pooler_config
from nanoengine.pooling.pooler import pool

DEFAULT_TOKEN_BUDGET = 8192


class Embedder:
    """Embeds token-id lists with ``loaded``'s model. Invariant: every batch holds at most
    ``token_budget`` tokens, or one sequence (which is at most ``max_model_len``)."""

    def __init__(self, loaded: LoadedModel, pooler_config: PoolerConfig | None = None,
                 max_num_batched_tokens: int | None = None) -> None:
        self.loaded = loaded
        self.is_encoder = getattr(loaded.model, "is_encoder", False)
        self.pooler_config = pooler_config or default_pooler_config(loaded.path, self.is_encoder)
        self.token_budget = max_num_batched_tokens or DEFAULT_TOKEN_BUDGET

    @torch.inference_mode()
    def embed(self, token_id_lists: list[list[int]]) -> list[torch.Tensor]:
        """One float32 vector ``[hidden_size]`` per token-id list, in order."""
        vectors: list[torch.Tensor] = []
        batch: list[list[int]] = []
        for ids in token_id_lists:
            if batch and sum(map(len, batch)) + len(ids) > self.token_budget:
                vectors += self._embed_batch(batch)
                batch = []
            batch.append(ids)
        if batch:
            vectors += self._embed_batch(batch)
        return vectors

    def _embed_batch(self, batch: list[list[int]]) -> list[torch.Tensor]:
        device = self.loaded.device
        starts = [0]
        for ids in batch:
            starts.append(starts[-1] + len(ids))
        input_ids = torch.tensor([t for ids in batch for t in ids], device=device)
        positions = torch.cat([torch.arange(len(ids), device=device) for ids in batch])
        hidden = self.loaded.model(input_ids, positions, PackedSequences(starts, causal=not self.is_encoder))
        pooled = pool(hidden, starts, self.pooler_config.pooling_type, self.pooler_config.normalize)
        return list(pooled.cpu())
