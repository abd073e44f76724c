"""Checking guesses against the target, inside the model runner (lesson 10).

The step computed every guessing request's last token and its guesses; row ``j`` of its
logits is the target's view of position ``j`` given the guesses before it. Each row gets
the sampler's full treatment (bias, banned tokens, penalties counting the guesses before it
as output, temperature and truncations), so the distribution checked against is exactly the
one plain decoding would have sampled from, position by position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nanoengine.sampling import SamplingRow, TokenLogprobs, gather_logprobs
from nanoengine.sampling.sampler import draw_tokens, target_probs
from nanoengine.scheduler.output import ScheduledRequest
from nanoengine.spec_decode.proposer import Proposal
from nanoengine.spec_decode.rejection import speculative_distributions


@dataclasses.dataclass(slots=True)
class Verified:
    """One request's result: its accepted guesses and then one token of the target's own."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    num_draft_tokens: int

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def _banned_at(s: ScheduledRequest, offset: int) -> Sequence[int]:
    """The tokens banned at ``offset`` guesses past the request's output (min_tokens)."""
    return s.banned_token_ids if len(s.output_token_ids) + offset < s.params.min_tokens else ()


def _rows(s: ScheduledRequest, guesses: list[int], generator: torch.Generator | None) -> list[SamplingRow]:
    output = list(s.output_token_ids)
    return [
        SamplingRow(s.params, generator, _banned_at(s, j), s.prompt_token_ids, output + guesses[:j])
        for j in range(len(guesses) + 1)
    ]


def verify(
    logits: torch.Tensor,
    requests: Sequence[ScheduledRequest],
    proposals: Sequence[Proposal],
    generators: Sequence[torch.Generator | None],
    shared_generator: torch.Generator,
) -> list[Verified]:
    """Accept or reject every request's guesses; ``logits`` holds ``len(guesses) + 1`` rows
    per request, in order. A greedy request keeps its guesses while they equal the target's
    argmax; a random one accepts guess ``j`` when a uniform draw falls below ``accept[j]``."""
    rows = [row for s, p, g in zip(requests, proposals, generators) for row in _rows(s, p.token_ids, g)]
    probs = target_probs(logits, rows)
    raw_logprobs = logits.float().log_softmax(dim=-1) if any(s.params.logprobs is not None for s in requests) else None
    results, first = [], 0
    for s, proposal, generator in zip(requests, proposals, generators):
        k = len(proposal.token_ids)
        guesses = torch.tensor(proposal.token_ids, dtype=torch.long, device=probs.device)
        draft_probs = None if proposal.probs is None else proposal.probs.to(probs.device, probs.dtype)
        accept, final = speculative_distributions(probs[first : first + k + 1], draft_probs, guesses)
        accept = accept.cpu()
        if s.params.greedy:
            accepted = accept >= 1
        else:
            drawing = generator or shared_generator
            accepted = torch.rand(k, generator=drawing, device=drawing.device) < accept
        num_accepted = k if bool(accepted.all()) else int(accepted.to(torch.int8).argmin())
        last = final[num_accepted : num_accepted + 1]
        if s.params.greedy:
            token = int(last.argmax())
        else:
            token = int(draw_tokens(last, [generator], shared_generator)[0])
        token_ids = proposal.token_ids[:num_accepted] + [token]
        logprobs = None
        if s.params.logprobs is not None:
            emitted = raw_logprobs[first : first + len(token_ids)]
            logprobs = gather_logprobs(emitted, token_ids, [s.params.logprobs] * len(token_ids))
        results.append(Verified(token_ids, logprobs, k))
        first += k + 1
    return results
