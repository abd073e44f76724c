"""The user-facing results of generation, shaped as vLLM's so code transfers unchanged."""

from __future__ import annotations

import dataclasses

from nanoengine.lora.request import LoRARequest


@dataclasses.dataclass(slots=True)
class Logprob:
    """A token's log-probability under the model's raw logits (as vLLM reports it);
    ``rank``: 1 for the most likely token of the vocabulary."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's log-probabilities: the chosen token and the top-k, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request.

    ``token_ids`` include the EOS or stop token that ended the sequence (as vLLM);
    ``text`` leaves out a matched stop string unless ``include_stop_str_in_output``.
    ``finish_reason`` is ``"stop"``, ``"length"`` or ``"abort"`` once finished, else None.
    With ``SamplingParams.logprobs`` set, ``logprobs`` has one entry per token and
    ``cumulative_logprob`` is their chosen tokens' sum; otherwise both are None.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
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
    """Everything a request produced so far; ``finished`` once every sequence has ended.

    ``outputs``: one completion per sequence (``n`` of them, by ``index``);
    ``prompt_logprobs``: with ``SamplingParams.prompt_logprobs`` set, None for the first
    prompt token (nothing predicts it) then one entry per prompt token. ``lora_request``:
    the adapter it ran with (lesson 14; None: the base model).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    lora_request: LoRARequest | None = None


@dataclasses.dataclass(slots=True)
class EmbeddingOutput:
    """One text's vector (``LLM.embed``, lesson 16); ``hidden_size`` floats."""

    embedding: list[float]


@dataclasses.dataclass(slots=True)
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt, shaped as vLLM's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
