"""A step's plan as it travels to other processes: only what changed since the last step.

A :class:`~nanoengine.scheduler.output.SchedulerOutput` names, for every scheduled request,
its whole prompt, its whole output so far and its whole block table: the runner's consumers
(penalties, speculation, prompt logprobs) read them. In the engine's own process those are
references to the request's lists and cost nothing; pickled to the worker ranks of a
parallel world every step (lesson 12) they cost time and bytes growing with every sequence,
quadratic over a request. So the driver sends a :class:`PlanDelta` instead, as vLLM's
scheduler does: a request's prompt, parameters and adapter once, when a rank first sees it
(again after a preemption, which makes the ranks forget it); afterwards only its new output
tokens, its chunk, and the change to its block table. Each rank keeps what it was told in a
:class:`PlanDecoder` and rebuilds the full plan, equal to the driver's.

Invariant: after the driver's :class:`PlanEncoder` has encoded a plan and a rank's
:class:`PlanDecoder` has decoded it, both hold the same request ids, and for each the same
block table and the same count of output tokens; a finished or preempted id is dropped by
both.
"""

from __future__ import annotations

import dataclasses

from nanoengine.lora.request import LoRARequest
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput


@dataclasses.dataclass(slots=True)
class NewRequestData:
    """What a rank keeps of a request it has not seen: sent once."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None


@dataclasses.dataclass(slots=True)
class ScheduledDelta:
    """One scheduled request's step, relative to what the ranks know of it: its block table
    keeps its first ``kept_blocks`` blocks and then has ``new_block_ids``; its output gained
    ``new_output_token_ids``. The other fields are :class:`ScheduledRequest`'s, all as small
    as the step's own work."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    kept_blocks: int
    new_block_ids: list[int]
    new_output_token_ids: list[int]
    sample: bool
    banned_token_ids: list[int]
    num_lookahead_tokens: int


@dataclasses.dataclass(slots=True)
class PlanDelta:
    """A :class:`SchedulerOutput` less what the ranks already know."""

    step: int
    new_requests: list[NewRequestData]
    scheduled: list[ScheduledDelta]
    preempted_request_ids: list[str]
    finished_request_ids: list[str]
    blocks_to_copy: list[tuple[int, int]]


@dataclasses.dataclass(slots=True)
class _Known:
    """What a rank holds of one request: all the driver sent of it so far."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    block_table: list[int]


def kept_prefix(old: list[int], new: list[int]) -> int:
    """How many leading blocks the two tables share. Tables change at their end (blocks
    appended, rejected guesses' blocks given back, a shared last block copied on write), so
    the whole old table is tried first, at C speed."""
    if len(new) >= len(old) and new[: len(old)] == old:
        return len(old)
    kept = 0
    for a, b in zip(old, new):
        if a != b:
            break
        kept += 1
    return kept


class PlanEncoder:
    """The driver's side: turns each plan into a :class:`PlanDelta` for the worker ranks."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[list[int], int]] = {}  # request id -> (block table, output tokens sent)

    def encode(self, plan: SchedulerOutput) -> PlanDelta:
        for request_id in (*plan.finished_request_ids, *plan.preempted_request_ids):
            self.sent.pop(request_id, None)
        new_requests, scheduled = [], []
        for s in plan.scheduled:
            known = self.sent.get(s.request_id)
            if known is None:
                new_requests.append(NewRequestData(
                    s.request_id, list(s.prompt_token_ids), list(s.output_token_ids), s.params, s.lora_request,
                ))
                known = ([], len(s.output_token_ids))
            old_table, num_output = known
            kept = kept_prefix(old_table, s.block_table)
            scheduled.append(ScheduledDelta(
                s.request_id, list(s.token_ids), s.num_computed_tokens, kept, list(s.block_table[kept:]),
                list(s.output_token_ids[num_output:]), s.sample, list(s.banned_token_ids), s.num_lookahead_tokens,
            ))
            self.sent[s.request_id] = (list(s.block_table), len(s.output_token_ids))
        return PlanDelta(plan.step, new_requests, scheduled, list(plan.preempted_request_ids),
                         list(plan.finished_request_ids), list(plan.blocks_to_copy))


class PlanDecoder:
    """A worker rank's side: keeps what the driver sent and rebuilds each full plan."""

    def __init__(self) -> None:
        self.requests: dict[str, _Known] = {}

    def decode(self, delta: PlanDelta) -> SchedulerOutput:
        for request_id in (*delta.finished_request_ids, *delta.preempted_request_ids):
            self.requests.pop(request_id, None)
        for new in delta.new_requests:
            self.requests[new.request_id] = _Known(
                new.prompt_token_ids, new.output_token_ids, new.params, new.lora_request, [],
            )
        scheduled = []
        for d in delta.scheduled:
            known = self.requests.get(d.request_id)
            if known is None:
                raise RuntimeError(f"the plan for step {delta.step} names request {d.request_id!r}, "
                                   "which this rank was never sent")
            known.output_token_ids.extend(d.new_output_token_ids)
            del known.block_table[d.kept_blocks:]
            known.block_table.extend(d.new_block_ids)
            scheduled.append(ScheduledRequest(
                request_id=d.request_id,
                token_ids=d.token_ids,
                num_computed_tokens=d.num_computed_tokens,
                block_table=list(known.block_table),
                sample=d.sample,
                params=known.params,
                banned_token_ids=d.banned_token_ids,
                prompt_token_ids=known.prompt_token_ids,
                output_token_ids=known.output_token_ids,
                num_lookahead_tokens=d.num_lookahead_tokens,
                lora_request=known.lora_request,
            ))
        return SchedulerOutput(delta.step, scheduled, delta.preempted_request_ids, delta.finished_request_ids,
                               delta.blocks_to_copy)
