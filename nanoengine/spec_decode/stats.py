"""Counting what speculation bought: proposed tokens, accepted tokens, and per verification."""

from __future__ import annotations

import collections
import dataclasses

HISTORY_LENGTH = 100_000  # verifications kept for plots; the counters cover all of them


@dataclasses.dataclass(slots=True)
class SpecDecodeStats:
    """Counters over every verification (one request's guesses checked in one step).

    ``num_drafts``: verifications; ``num_draft_tokens``: guesses checked; ``num_accepted_tokens``:
    guesses accepted. ``history``: ``(engine step, guesses, accepted)`` of the latest
    verifications, for the lesson's plots.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    history: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH))

    def observe(self, step: int, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        self.history.append((step, num_draft_tokens, num_accepted))

    @property
    def acceptance_rate(self) -> float:
        """Accepted guesses per guess checked."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification emits on average: the accepted guesses plus the one the
        target adds (vLLM's definition; 1.0 means speculation bought nothing)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0
