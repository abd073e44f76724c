"""Prompt lookup: guess that the text goes on as it did the last time it said the same thing.

When an answer copies from its prompt (code edits, quotes, summaries with names, JSON
fields), the last few tokens usually occurred before, and what followed them then is a good
guess for what follows now. No model runs: the guess costs a scan of the token ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nanoengine.spec_decode.proposer import Proposal, ProposalRequest


def propose_ngram(token_ids: Sequence[int], max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``max_tokens`` guesses for what follows ``token_ids``.

    Try the longest suffix first: for ``n = max_n`` down to ``min_n``, find the latest
    earlier occurrence of the last ``n`` tokens; the first ``n`` that has one wins, and the
    guesses are the tokens that followed it (fewer at the end of the sequence). No
    occurrence of any length: no guesses.
    """
    # BEGIN SOLUTION L10.T1
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(token_ids[length - n :])
        for start in range(length - n - 1, -1, -1):
            if list(token_ids[start : start + n]) == suffix:
                follow = start + n
                return list(token_ids[follow : follow + max_tokens])
    return []
    # END SOLUTION


class NgramProposer:
    """Prompt lookup over each request's own tokens (vLLM's ``method: "ngram"``)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        return [Proposal(propose_ngram(r.token_ids, r.max_tokens, self.min_n, self.max_n)) for r in requests]

    def forget(self, request_ids: Iterable[str]) -> None:
        """Nothing is kept between steps."""
