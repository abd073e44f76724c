"""Benchmark prompts: random token ids from a fixed seed, so every run measures the same work."""

from __future__ import annotations

import random


def random_prompt_token_ids(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``num_prompts`` prompts of ``input_len`` ids drawn uniformly from the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
