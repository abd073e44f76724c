"""The user-facing results of generation, shaped as vLLM's so code transfers unchanged."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request.

    ``token_ids`` include the EOS or stop token that ended the sequence (as vLLM);
    ``text`` leaves out a matched stop string unless ``include_stop_str_in_output``.
    ``finish_reason`` is ``"stop"``, ``"length"`` or ``"abort"`` once finished, else None.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times of a request's life (``time.monotonic`` seconds)."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass(slots=True)
class RequestOutput:
    """Everything a request produced so far; ``finished`` once every sequence has ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
