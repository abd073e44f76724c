"""Logits processors: each reshapes a ``[B, V]`` float32 batch of logits row by row.

A processor takes one value per row (a ``[B]`` tensor), so requests with different
settings share one call. Removed tokens get ``-inf``; every truncating processor keeps at
least the most likely token, so a row never ends up empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature: below 1 sharpens, above 1 flattens."""
    # BEGIN SOLUTION L01.T2
    return logits / temperature[:, None]
    # END SOLUTION


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``k`` largest logits (``k = 0`` keeps all)."""
    # BEGIN SOLUTION L01.T2
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    kth_largest = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth_largest, float("-inf"))
    # END SOLUTION


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (nucleus)."""
    # BEGIN SOLUTION L01.T2
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
    # END SOLUTION


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    """Add ``biases[i][token]`` to row ``i``'s logit of ``token`` (OpenAI's ``logit_bias``).

    All (row, token) pairs of the batch go in one ``index_put``, however many rows have a bias.
    """
    vocab = logits.shape[-1]
    pairs = [(row, token, value) for row, bias in enumerate(biases) for token, value in (bias or {}).items()]
    if not pairs:
        return logits
    bad = [token for _, token, _ in pairs if not 0 <= token < vocab]
    if bad:
        raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {vocab}): {bad}")
    rows, tokens, values = zip(*pairs)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def token_counts(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """How often each token occurs in each list: ``[B, vocab_size]`` int64 (the penalties' input).

    Lists of different lengths are padded with the id ``vocab_size``, counted in a spare
    column that is then dropped, so one ``scatter_add`` covers the batch.
    """
    longest = max((len(ids) for ids in token_lists), default=0)
    padded = torch.tensor([list(ids) + [vocab_size] * (longest - len(ids)) for ids in token_lists],
                          dtype=torch.long, device=device).reshape(len(token_lists), longest)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.long, device=device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded))[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Apply vLLM's repetition, then frequency and presence penalties, one value per row.

    Repetition acts on tokens in the prompt or the output (``prompt_mask`` or
    ``output_counts > 0``): positive logits are divided by it, the others multiplied.
    Then ``logits -= frequency * count + presence * (count > 0)``, counting output tokens only.
    """
    # BEGIN SOLUTION L09.T1
    seen = prompt_mask | (output_counts > 0)
    repetition = repetition[:, None]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    counts = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)
    # END SOLUTION
