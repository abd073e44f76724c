"""Driving the scheduler without a model: for lessons, figures and tests.

:func:`simulate_step` does what ``LLMEngine.step`` does around the model (plan, mark the
scheduled tokens computed, append each sampled token, finish requests at ``max_tokens``)
with a stand-in model that always samples the same token. Plain Python, like the scheduler.
"""

from __future__ import annotations

from nanoengine.request import RequestStatus
from nanoengine.scheduler.output import SchedulerOutput
from nanoengine.scheduler.scheduler import Scheduler


def simulate_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """One engine step in which every sampled token is ``token``; returns the step's plan."""
    plan = scheduler.schedule()
    complete_step(scheduler, plan, token)
    return plan


def complete_step(scheduler: Scheduler, plan: SchedulerOutput, token: int) -> None:
    """What the engine does after ``plan`` ran, with the stand-in model's ``token`` sampled."""
    scheduler.update_after_step(plan)
    for s in plan.scheduled:
        if s.sample:
            request = scheduler.requests[s.request_id]
            request.output_token_ids.append(token)
            if len(request.output_token_ids) >= request.params.max_tokens:
                request.status = RequestStatus.FINISHED_LENGTH
                scheduler.finish_request(s.request_id)
