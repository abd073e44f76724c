"""The sampler: processed logits -> one token per row, greedy or random.

Randomness comes from one ``torch.Generator`` per row: a request with a ``seed`` gets its
own, so its tokens do not depend on anything else the engine is doing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoengine.sampling.processors import apply_min_p, apply_temperature, apply_top_k, apply_top_p
from nanoengine.sampling_params import SamplingParams


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    banned_token_ids: Sequence[Sequence[int]] = (),
) -> list[int]:
    """Pick the next token of each row of ``logits`` (``[B, V]``, float32).

    ``banned_token_ids[i]`` are masked out of row ``i`` first (EOS before ``min_tokens``).
    Greedy rows take the argmax; the others are processed (temperature, top-k, top-p,
    min-p) and drawn from the resulting distribution with their own generator.
    """
    logits = logits.float().clone()
    for row, banned in enumerate(banned_token_ids):
        if banned:
            logits[row, list(banned)] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return tokens
    rows = logits[random_rows]
    chosen = [params[i] for i in random_rows]
    rows = apply_temperature(rows, torch.tensor([p.temperature for p in chosen]))
    rows = apply_top_k(rows, torch.tensor([p.top_k for p in chosen]))
    rows = apply_top_p(rows, torch.tensor([p.top_p for p in chosen]))
    rows = apply_min_p(rows, torch.tensor([p.min_p for p in chosen]))
    probs = rows.softmax(dim=-1)
    for j, i in enumerate(random_rows):
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens
