"""Benchmark prompts: random token ids from a fixed seed, so every run measures the same work."""

from __future__ import annotations

import math
import random


def random_prompt_token_ids(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``num_prompts`` prompts of ``input_len`` ids drawn uniformly from the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def realistic_lengths(num_requests: int, max_model_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths with a chat workload's long tail: log-normal, median prompt
    ~200 and output ~150 tokens, clipped to [8, 2048] and [4, 1024] and to ``max_model_len``."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(num_requests):
        prompt = min(2048, max(8, round(rng.lognormvariate(math.log(200), 0.8))))
        output = min(1024, max(4, round(rng.lognormvariate(math.log(150), 0.9))))
        prompt = min(prompt, max_model_len - 1)
        lengths.append((prompt, min(output, max_model_len - prompt)))
    return lengths


def random_lengths(num_requests: int, input_len: int, output_len: int, range_ratio: float, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths drawn uniformly from ``[len * (1 - r), len * (1 + r)]``, as
    vLLM's random dataset does; ``range_ratio`` 0 gives every request the same lengths."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1); got {range_ratio}")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        return rng.randint(max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio))))

    return [(draw(input_len), draw(output_len)) for _ in range(num_requests)]
