"""A request's state inside the engine: its tokens, how far it got, and why it ended.

Plain Python (no torch): the scheduler of lesson 06 reasons about these without tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence

from nanoengine.lora.request import LoRARequest
from nanoengine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class TokenView(Sequence[int]):
    """A request's prompt followed by its output, read in place.

    The scheduler reads a request's tokens every step (its next chunk, the slots to
    allocate, the blocks to hash); concatenating prompt and output each time would cost
    time growing with the sequence every step, quadratic over a request. Indexing reads the
    two lists; a slice copies only the tokens it names. Invariant: it sees the lists as
    they are now (an output token appended later shows up).
    """

    __slots__ = ("prompt", "output")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt = prompt
        self.output = output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, index: int | slice) -> int | list[int]:  # type: ignore[override]
        split = len(self.prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if stop <= split:
                return self.prompt[start:stop]
            if start >= split:
                return self.output[start - split : stop - split]
            return self.prompt[start:] + self.output[: stop - split]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        return self.prompt[position] if position < split else self.output[position - split]


@dataclasses.dataclass(slots=True)
class Request:
    """One prompt and its (single) growing output.

    Invariants: ``num_computed_tokens <= num_tokens`` (K/V of the first
    ``num_computed_tokens`` tokens are in the cache; preemption resets it to 0); once
    ``status.finished``, no token is
    appended; ``stop_reason`` is set only for a stop string (str) or a stop token id (int).
    ``lora_request``: the adapter every token of it runs with (lesson 14; None: the base model).
    ``mm_hashes``: digests of its images (lesson 16), which key its blocks in the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_computed_tokens: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None
    lora_request: LoRARequest | None = None
    mm_hashes: tuple[str, ...] = ()

    @property
    def cache_keys(self) -> tuple:
        """What, besides its tokens, its cached blocks depend on: its adapter and its images."""
        return (*(self.lora_request.cache_keys if self.lora_request is not None else ()), *self.mm_hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> TokenView:
        """Prompt then output, without copying them (slice it for a list)."""
        return TokenView(self.prompt_token_ids, self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def max_total_tokens(self, max_model_len: int) -> int:
        """The longest this request may grow: prompt + max_tokens, capped by the model."""
        if self.params.max_tokens is None:
            return max_model_len
        return min(max_model_len, len(self.prompt_token_ids) + self.params.max_tokens)

    def child(self, index: int) -> Request:
        """Sequence ``index`` of a parallel-sampling request (``n > 1``), forked after the prompt.

        It shares the prompt and what was computed of it; its params ask for one sequence,
        and a seeded request's children get seeds ``seed + index`` (as vLLM), so the n samples
        differ and the whole request stays reproducible.
        """
        return Request(
            request_id=child_request_id(self.request_id, index),
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            params=child_params(self.params, index),
            eos_token_ids=self.eos_token_ids,
            arrival_time=self.arrival_time,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            lora_request=self.lora_request,
        )

    def banned_token_ids(self) -> list[int]:
        """Tokens that may not be sampled yet: EOS and stop tokens before ``min_tokens``."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return []
        return sorted(set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_token_ids)))


def child_request_id(parent_id: str, index: int) -> str:
    """The engine-internal id of sequence ``index`` of request ``parent_id`` (vLLM's form)."""
    return f"{index}_{parent_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sequence ``index`` of a parallel-sampling request."""
    seed = None if params.seed is None else (params.seed + index) % 2**64
    return dataclasses.replace(params, n=1, seed=seed, prompt_logprobs=None)  # the parent computed those


def check_token_stop(request: Request, max_model_len: int) -> bool:
    """Finish ``request`` if its newest token ends it; return True if it did.

    Order as vLLM: nothing stops before ``min_tokens`` (EOS and stop tokens were masked out
    of sampling until then), then EOS (unless ``ignore_eos``), stop token ids, and last the
    length limits (``max_tokens``, and ``max_model_len`` for the whole sequence).
    """
    params, last = request.params, request.output_token_ids[-1]
    num_output = len(request.output_token_ids)
    if num_output >= params.min_tokens:
        if not params.ignore_eos and last in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if last in params.stop_token_ids:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, last
            return True
    if request.num_tokens >= request.max_total_tokens(max_model_len):
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False


def append_token(request: Request, token: int, max_model_len: int) -> bool:
    """Append a sampled token to ``request`` and finish it if the token ends it (EOS, a stop
    token, a length limit); return True if it did. Only the request's owner calls this: the
    scheduler in lesson 06's engine, the engine itself in lessons 01–04's loop. The output
    processor reads the request and reports a stop string (:func:`stop_on_string`) instead
    of writing it, so one place decides a request's state."""
    request.output_token_ids.append(token)
    request.first_token_time = request.first_token_time or time.monotonic()
    if not check_token_stop(request, max_model_len):
        return False
    request.finished_time = time.monotonic()
    return True


def stop_on_string(request: Request, stop: str) -> None:
    """Finish ``request`` on the stop string its text just completed (the owner's write)."""
    request.stop_reason, request.status = stop, RequestStatus.FINISHED_STOPPED
    request.finished_time = time.monotonic()
