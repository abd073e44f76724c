"""What every proposer gets and returns: the runner asks, once per step, for guesses for
every request the scheduler gave lookahead slots to."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

import torch

from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class ProposalRequest:
    """One request asking for guesses.

    ``token_ids``: its verified sequence (prompt and output; the last token is the one this
    step computes); ``max_tokens``: at most this many guesses (its lookahead slots);
    ``block_table`` covers ``len(token_ids) + max_tokens`` slots; ``generator``: a seeded
    request's own (None: the runner's shared one).
    """

    request_id: str
    token_ids: list[int]
    max_tokens: int
    params: SamplingParams
    block_table: list[int]
    generator: torch.Generator | None = None


@dataclasses.dataclass(slots=True)
class Proposal:
    """Guessed tokens, and the distribution each was drawn from (``[len(token_ids), V]``).

    ``probs`` None means every guess was certain (one-hot): prompt lookup, or a greedy draft.
    Exactness does not depend on how good the guesses are, only on ``probs`` being the
    distribution they were really drawn from.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        """One proposal per request, at most ``max_tokens`` guesses each (possibly none)."""
        ...

    def forget(self, request_ids: Iterable[str]) -> None:
        """These requests finished or were preempted: drop whatever was kept for them."""
        ...
