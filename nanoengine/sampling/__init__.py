"""Turning logits into the next token: logits processors and the sampler."""

from nanoengine.sampling.sampler import sample_next_tokens

__all__ = ["sample_next_tokens"]
