"""Turning logits into the next token: logits processors, the sampler and logprobs."""

from nanoengine.sampling.logprobs import TokenLogprobs, gather_logprobs
from nanoengine.sampling.sampler import SamplerOutput, SamplingRow, sample

__all__ = ["SamplerOutput", "SamplingRow", "TokenLogprobs", "gather_logprobs", "sample"]
