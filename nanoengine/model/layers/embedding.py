"""The vocabulary layers: token embedding in, logits out (optionally the same matrix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.model.layers.linear import LinearMethod, UnquantizedLinearMethod


class VocabEmbedding(nn.Module):
    """Looks up one row per token id. Lesson 12 splits the rows across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits.

    With tied embeddings the head shares the embedding's ``weight`` parameter (one tensor in
    memory, loaded once), as the checkpoint has no separate ``lm_head.weight``. Like the
    linear layers it applies its weight through a :class:`LinearMethod`, so the CPU fast path
    (lesson 15) can swap in prepacked weights.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tied_to: VocabEmbedding | None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
        self.linear_method: LinearMethod = UnquantizedLinearMethod()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, hidden, None)
