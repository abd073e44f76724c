"""What crosses from the scheduler to the worker: plain, picklable records (no tensors)."""

from __future__ import annotations

import dataclasses

from nanoengine.lora.request import LoRARequest
from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The worker computes ``token_ids`` at positions ``num_computed_tokens ..`` using the
    blocks in ``block_table``; when ``sample`` is true (the chunk reaches the end of the
    sequence) it also samples the next token, never one of ``banned_token_ids`` (``params.n``
    tokens when the request is about to fork into ``n`` sequences, lesson 08).
    ``prompt_token_ids`` / ``output_token_ids`` are the whole sequence so far, which the
    penalties and prompt logprobs of lesson 09 need. ``num_lookahead_tokens``: slots after
    ``token_ids`` in ``block_table`` for that many guessed tokens (speculation, lesson 10).
    ``lora_request``: the adapter its tokens run with (lesson 14; None: the base model).
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool
    params: SamplingParams
    banned_token_ids: list[int]
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_lookahead_tokens: int = 0
    lora_request: LoRARequest | None = None


@dataclasses.dataclass(slots=True)
class SchedulerOutput:
    """A step's plan. ``finished_request_ids``: requests gone since the last step (the
    worker drops their sampling state); ``preempted_request_ids``: sent back to waiting;
    ``blocks_to_copy``: (source, destination) block copies to make before the step runs
    (copy-on-write, lesson 08)."""

    step: int
    scheduled: list[ScheduledRequest]
    preempted_request_ids: list[str]
    finished_request_ids: list[str]
    blocks_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)
