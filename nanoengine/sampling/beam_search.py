"""Lesson 09: beam search, as vLLM's ``LLM.beam_search`` runs it.

Keep the ``beam_width`` most likely sequences instead of one. Every step, each live beam
proposes its most likely next tokens (``2 * beam_width`` of them, so that enough survive
even if some end); all proposals are ranked by score and the best ``beam_width`` live on.
A proposal that ends with EOS is set aside as finished. At the end the finished and the
live beams compete on score, ``cum_logprob / length ** length_penalty``.

The engine needs nothing new for this: each step is an ordinary generation of one token
with ``logprobs``, one request per beam. Beams share their prompt's (and each other's)
full blocks through the prefix cache of lesson 08, so a step recomputes only the partly
filled last block of each beam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from nanoengine.outputs import PositionLogprobs


@dataclasses.dataclass(slots=True)
class BeamSearchParams:
    """vLLM's beam search settings; invalid values raise ``ValueError`` naming the field."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1; got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool; got {self.ignore_eos!r}")
        for name, low in (("temperature", 0.0), ("length_penalty", None)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise ValueError(f"{name} must be a number; got {value!r}")
            if low is not None and value < low:
                raise ValueError(f"{name} must be at least {low}; got {value}")


@dataclasses.dataclass(slots=True)
class BeamSearchSequence:
    """One beam: ``tokens`` include the prompt; ``logprobs`` one entry per generated token;
    ``text`` (the generated part) is filled in when the search returns it."""

    tokens: list[int]
    logprobs: list[PositionLogprobs] = dataclasses.field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclasses.dataclass(slots=True)
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(beam: BeamSearchSequence, eos_token_ids: Collection[int], length_penalty: float) -> float:
    """``cum_logprob / length ** length_penalty``; the length counts the prompt (as vLLM) but
    not a final EOS. ``length_penalty`` above 1 favours longer sequences."""
    length = len(beam.tokens) - (1 if beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / length**length_penalty


def expand_beams(
    beams: Sequence[BeamSearchSequence],
    next_logprobs: Sequence[PositionLogprobs],
    beam_width: int,
    eos_token_ids: Collection[int],
    length_penalty: float = 1.0,
    ignore_eos: bool = False,
) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """One step: every beam extended by each of its proposed tokens (``next_logprobs[i]``:
    token id -> Logprob for beam ``i``). Returns the ``beam_width`` best live beams, best
    first, and the proposals that ended with EOS (finished)."""
    live, finished = [], []
    # BEGIN SOLUTION L09.T3
    for beam, proposals in zip(beams, next_logprobs):
        for token, logprob in proposals.items():
            candidate = BeamSearchSequence(
                beam.tokens + [token], beam.logprobs + [proposals], beam.cum_logprob + logprob.logprob
            )
            if token in eos_token_ids and not ignore_eos:
                candidate.finish_reason = "stop"
                finished.append(candidate)
            else:
                live.append(candidate)
    live.sort(key=lambda b: beam_search_score(b, eos_token_ids, length_penalty), reverse=True)
    # END SOLUTION
    return live[:beam_width], finished


def best_beams(
    beams: Sequence[BeamSearchSequence], beam_width: int, eos_token_ids: Collection[int], length_penalty: float
) -> list[BeamSearchSequence]:
    """The final ranking: finished and still-live beams together, best ``beam_width`` first."""
    return sorted(beams, key=lambda b: beam_search_score(b, eos_token_ids, length_penalty), reverse=True)[:beam_width]
