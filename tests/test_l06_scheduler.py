"""Lesson 06: the scheduler as a state machine (no model): queues, budgets, blocks, liveness."""

from __future__ import annotations

import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.request import Request, RequestStatus
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.simulate import simulate_step

pytestmark = [pytest.mark.l06, pytest.mark.l06_t1]


class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, steps run (a fake model samples token 7), requests finish or abort."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler: Scheduler | None = None
        self.max_len = 0
        self.next_id = 0
        self.gone: list[Request] = []

    @precondition(lambda self: self.scheduler is None)
    @rule(block_size=st.sampled_from([1, 2, 4, 16]), extra_blocks=st.integers(0, 12),
          max_num_seqs=st.integers(1, 4), budget_extra=st.integers(0, 20), chunked=st.booleans())
    def start(self, block_size, extra_blocks, max_num_seqs, budget_extra, chunked):
        self.max_len = 24  # the longest request (prompt + output) this machine will create
        num_blocks = math.ceil(self.max_len / block_size) + extra_blocks  # one longest request always fits
        budget = max_num_seqs + budget_extra if chunked else max(self.max_len, max_num_seqs + budget_extra)
        self.scheduler = Scheduler(KVCacheManager(num_blocks, block_size), budget, max_num_seqs, chunked)

    @precondition(lambda self: self.scheduler is not None)
    @rule(prompt_len=st.integers(1, 16), max_tokens=st.integers(1, 8))
    def add(self, prompt_len, max_tokens):
        request = Request(f"r{self.next_id}", None, [3] * prompt_len, SamplingParams(max_tokens=max_tokens),
                          frozenset({0}), 0.0)
        self.next_id += 1
        self.scheduler.add_request(request)

    @precondition(lambda self: self.scheduler is not None)
    @rule()
    def step(self):
        sched = self.scheduler
        before = dict(sched.requests)
        running_before = {r.request_id for r in sched.running}
        plan = simulate_step(sched)
        assert plan.num_batched_tokens <= sched.token_budget
        assert len(plan.scheduled) <= sched.max_num_seqs
        assert len({s.request_id for s in plan.scheduled}) == len(plan.scheduled)
        for s in plan.scheduled:
            request = before[s.request_id]
            assert request.num_computed_tokens == s.num_computed_tokens + len(s.token_ids)
            assert s.token_ids == request.all_token_ids[s.num_computed_tokens : s.num_computed_tokens + len(s.token_ids)]
            assert s.request_id in running_before or s.num_computed_tokens == 0  # admitted ones start at 0
        self.gone += [r for rid, r in before.items() if rid not in sched.requests]

    @precondition(lambda self: self.scheduler is not None and self.scheduler.requests)
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        request = self.scheduler.requests[request_id]
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        assert request.status == RequestStatus.FINISHED_ABORTED
        self.gone.append(request)

    @invariant()
    def each_request_in_exactly_one_queue(self):
        if self.scheduler is None:
            return
        waiting = [r.request_id for r in self.scheduler.waiting]
        running = [r.request_id for r in self.scheduler.running]
        assert sorted(waiting + running) == sorted(self.scheduler.requests)
        assert not set(waiting) & set(running)

    @invariant()
    def blocks_cover_computed_tokens_and_nothing_else_holds_blocks(self):
        if self.scheduler is None:
            return
        kv = self.scheduler.kv
        for request in self.scheduler.running:
            assert len(kv.block_table(request.request_id)) * kv.block_size >= request.num_computed_tokens
        for request in self.scheduler.waiting:
            assert request.request_id not in kv.tables and request.num_computed_tokens == 0
        for request in self.gone:
            assert request.request_id not in kv.tables
        held = sum(len(t) for t in kv.tables.values())
        assert held + kv.num_free_blocks == kv.pool.num_blocks

    def teardown(self):
        """Liveness: with no new arrivals, every request finishes in a bounded number of steps."""
        if self.scheduler is None:
            return
        bound = 4 * (self.next_id + 1) * self.max_len
        for _ in range(bound):
            if not self.scheduler.has_unfinished_requests():
                break
            self.step()
        assert not self.scheduler.has_unfinished_requests(), "requests starved"
        assert self.scheduler.kv.num_free_blocks == self.scheduler.kv.pool.num_blocks


TestScheduler = SchedulerMachine.TestCase


def test_oldest_running_request_keeps_its_blocks_under_pressure():
    """When blocks run out, the newest running request is preempted, not the oldest."""
    kv = KVCacheManager(num_blocks=4, block_size=2)
    sched = Scheduler(kv, token_budget=16, max_num_seqs=4)
    old = Request("old", None, [1] * 4, SamplingParams(max_tokens=20), frozenset(), 0.0)
    new = Request("new", None, [1] * 4, SamplingParams(max_tokens=20), frozenset(), 1.0)
    sched.add_request(old)
    sched.add_request(new)
    sched.update_after_step(sched.schedule())  # both prefilled: 4 blocks used
    for request in (old, new):
        request.output_token_ids.append(5)
    plan = sched.schedule()  # both need a 3rd block: none free
    assert plan.preempted_request_ids == ["new"]
    assert [s.request_id for s in plan.scheduled] == ["old"]
    assert new.status == RequestStatus.WAITING and "new" not in kv.tables
    assert sched.num_preemptions == 1
