"""Continuous batching (lesson 06) with chunked prefill (lesson 07) and preemption.

Every step the scheduler fills a token budget. Running requests go first, oldest first:
a decode costs one token, an unfinished prompt costs its next chunk. Then waiting requests
are admitted, oldest first, while budget, ``max_num_seqs`` and free blocks last. Requests
join and leave between any two steps; nobody waits for a whole batch to finish.

When the pool runs out of blocks for a running request, the newest running request is
*preempted*: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed from its tokens (prompt + output so far) when memory frees up.

Lesson 14: a step may use at most ``max_loras`` LoRA adapters (each needs a slot on the
device). A waiting request whose adapter would be one too many is set aside for the step,
and the others are admitted as usual.
"""

from __future__ import annotations

import collections

from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.request import Request, RequestStatus, append_token, stop_on_string
from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput
from nanoengine.trace import Trace


class Scheduler:
    """Waiting and running queues over a KV cache manager.

    Invariants: every live request is in exactly one of ``waiting`` / ``running``; a running
    request owns blocks for all its computed tokens, a waiting one owns none (preemption
    frees them all); a step never schedules more than ``token_budget`` tokens or more than
    ``max_num_seqs`` requests.
    """

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        token_budget: int,
        max_num_seqs: int,
        enable_chunked_prefill: bool = True,
        trace: Trace | None = None,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        speculation_max_batch: int | None = None,
        max_loras: int | None = None,
    ) -> None:
        if num_speculative_tokens and max_model_len is None:
            raise ValueError("a speculating scheduler needs max_model_len, to keep guesses inside the context")
        self.kv = kv_cache_manager
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.speculation_max_batch = speculation_max_batch
        self.max_loras = max_loras
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.trace = trace
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step = 0
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.cache_keys:
            self.kv.set_extra_keys(request.request_id, request.cache_keys)
        self._record("arrive", request.request_id, token_ids=request.prompt_token_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        """Plan one step."""
        speculate = self.num_speculative_tokens > 0 and (
            self.speculation_max_batch is None or len(self.running) < self.speculation_max_batch
        )
        reserved = self._lookahead_budget() if speculate else 0
        budget = self.token_budget - reserved
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        queue = self._set_aside_over_lora_limit()
        # BEGIN SOLUTION L06.T1
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(
                request.request_id, request.all_token_ids[: request.num_computed_tokens + num_new]
            ):
                victim = self.running.pop()  # the newest running request gives its blocks back
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
        while self.waiting and not preempted and budget > 0:
            request = self.waiting[0]
            if len(self.running) + request.params.n > self.max_num_seqs:  # n > 1 forks into n
                break
            computed_blocks = self._cached_prefix(request)  # lesson 08: [] without prefix caching
            num_computed = len(computed_blocks) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            end = num_computed + num_new
            if not self.kv.allocate_slots(request.request_id, request.all_token_ids[:end], computed_blocks):
                break
            request.num_computed_tokens = num_computed
            self._count_cache_lookup(request, computed_blocks)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        # END SOLUTION
        # BEGIN STUB
        # # 1. Running requests, oldest first, while budget lasts: allocate each one's next chunk,
        # #    preempting the newest running request while the pool is short (see the hint).
        # # 2. Then, if nothing was preempted, admit waiting requests, oldest first, while budget,
        # #    max_num_seqs and free blocks last (a prompt longer than the budget is chunked).
        # END STUB
        self._restore_waiting(queue)
        if speculate:
            self._reserve_lookahead(scheduled, budget + reserved)
        output = SchedulerOutput(
            self.step, scheduled, preempted, self._finished_since_last_step, self.kv.take_pending_copies()
        )
        self._finished_since_last_step = []
        for s in scheduled:
            self._record("schedule", s.request_id, token_ids=s.token_ids, first_position=s.num_computed_tokens)
        self.step += 1
        if self.trace is not None:
            self.trace.next_step()
        return output

    def _set_aside_over_lora_limit(self) -> list[Request] | None:
        """Lesson 14: take out of ``waiting``, for this step, each request whose adapter would
        be one more than ``max_loras`` (counting the running requests' adapters and those of
        the waiting requests ahead of it). Returns the queue as it was, for
        :meth:`_restore_waiting` (None: nothing was set aside)."""
        if self.max_loras is None:
            return None
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        admissible = []
        for request in self.waiting:
            lora_id = request.lora_request.lora_int_id if request.lora_request is not None else None
            if lora_id is None or lora_id in adapters or len(adapters) < self.max_loras:
                admissible.append(request)
                if lora_id is not None:
                    adapters.add(lora_id)
        if len(admissible) == len(self.waiting):
            return None
        queue = list(self.waiting)
        self.waiting = collections.deque(admissible)
        return queue

    def _restore_waiting(self, queue: list[Request] | None) -> None:
        """Put the requests set aside back in their places: the step's preempted requests
        first, then ``queue``'s requests that are still waiting, in its order."""
        if queue is None:
            return
        before = {id(r) for r in queue}
        preempted = [r for r in self.waiting if id(r) not in before]
        self.waiting = collections.deque(preempted + [r for r in queue if r.status is RequestStatus.WAITING])

    def _guesses_wanted(self, request: Request) -> int:
        """How many guesses a running request could take this step (lesson 10): none unless it
        is decoding (only its newest token left to compute), and never past its length limit,
        since ``k`` guesses can emit ``k + 1`` tokens."""
        if request.num_tokens - request.num_computed_tokens != 1 or not request.output_token_ids:
            return 0
        room = request.max_total_tokens(self.max_model_len) - request.num_tokens - 1
        return max(0, min(self.num_speculative_tokens, room))

    def _lookahead_budget(self) -> int:
        """The step budget kept for running requests' guesses: what their real tokens leave,
        taken before waiting prompts are admitted (vLLM's order), so a long prompt being
        prefilled does not silence everyone's speculation."""
        real = sum(r.num_tokens - r.num_computed_tokens for r in self.running)
        wanted = sum(self._guesses_wanted(r) for r in self.running)
        return max(0, min(wanted, self.token_budget - real))

    def _reserve_lookahead(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        """Lesson 10: give decoding requests slots for guessed tokens, out of ``budget`` (the
        kept share plus what the step left over), oldest first.

        Short of free blocks, a request simply does not guess this step; nobody is preempted
        for a guess.
        """
        for s in scheduled:
            if budget <= 0:
                break
            request = self.requests[s.request_id]
            if not s.sample or len(s.token_ids) != 1:
                continue
            k = min(self._guesses_wanted(request), budget)
            if k > 0 and self.kv.allocate_slots(s.request_id, request.all_token_ids, num_lookahead_tokens=k):
                s.num_lookahead_tokens = k
                s.block_table = list(self.kv.block_table(s.request_id))
                budget -= k

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks an admitted request starts from (lesson 08).

        None for a request that asked for prompt logprobs: those need the logits of every
        prompt token, so its prompt is computed in full (as vLLM does).
        """
        if request.params.prompt_logprobs is not None:
            return []
        return self.kv.get_computed_blocks(request.all_token_ids, self.kv.extra_keys.get(request.request_id, ()))

    def _count_cache_lookup(self, request: Request, computed_blocks: list[int]) -> None:
        """Add an admitted request's prefix-cache lookup to the hit and query counters."""
        if self.kv.enable_prefix_caching and request.params.prompt_logprobs is None:
            stats = self.kv.stats
            stats.requests += 1
            stats.queried_blocks += (request.num_tokens - 1) // self.kv.block_size
            stats.hit_blocks += len(computed_blocks)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            num_computed_tokens=start,
            block_table=list(self.kv.block_table(request.request_id)),
            sample=start + num_new == request.num_tokens,
            params=request.params,
            banned_token_ids=request.banned_token_ids(),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            lora_request=request.lora_request,
        )

    def fork(self, parent_id: str, num_children: int) -> list[Request]:
        """Replace a request that just finished its prompt by ``num_children`` sequences.

        Parallel sampling (``n > 1``) computes the prompt once; then each child takes the
        parent's place in the running queue with the parent's blocks, all shared (the cache
        manager copies a shared block only when a child first writes into it).
        """
        parent = self.requests.pop(parent_id)
        children = [parent.child(index) for index in range(num_children)]
        for child in children:
            if child.request_id in self.requests:
                raise ValueError(f"request id {child.request_id!r} is already in use")
            self.kv.fork(parent_id, child.request_id)
            self.requests[child.request_id] = child
        self.kv.free(parent_id)
        self.kv.forget(parent_id)
        index = self.running.index(parent)
        self.running[index : index + 1] = children
        self._finished_since_last_step.append(parent_id)
        return children

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self._record("preempt", request.request_id)

    def update_after_step(self, output: SchedulerOutput, sampled: dict[str, list[int]] | None = None) -> None:
        """The step ran: its scheduled tokens are now in the cache.

        A request that guessed (lesson 10) also has its accepted guesses in the cache: all
        of ``sampled[id]`` but the last token, which is new. Its rejected guesses' slots are
        given back.
        """
        for s in output.scheduled:
            request = self.requests[s.request_id]
            request.num_computed_tokens += len(s.token_ids)
            if s.num_lookahead_tokens:
                accepted = (sampled or {}).get(s.request_id, [None])[:-1]
                request.num_computed_tokens += len(accepted)
                self.kv.truncate(s.request_id, [*request.all_token_ids, *accepted])

    def append_token(self, request_id: str, token: int) -> bool:
        """A sampled token of a running request: appended, and the request finished if the token
        ends it (EOS, a stop token, its length); True if it did. The scheduler is the one writer
        of its requests' state: the engine's output processing only reads them."""
        if self.max_model_len is None:
            raise ValueError("a scheduler that takes sampled tokens needs max_model_len, to know where a request ends")
        return append_token(self.requests[request_id], token, self.max_model_len)

    def stop_on_string(self, request_id: str, stop: str) -> None:
        """The request's text completed the stop string ``stop``: it ends there."""
        stop_on_string(self.requests[request_id], stop)

    def finish_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        """Remove a finished or aborted request and free its blocks (a no-op if already gone)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request_id in self.kv.tables:
            self.kv.free(request_id)
        self.kv.forget(request_id)
        if not request.status.finished:
            request.status = status
        self._finished_since_last_step.append(request_id)
        self._record("finish", request_id)

    def _record(self, kind: str, request_id: str, token_ids=(), first_position: int = 0) -> None:
        if self.trace is not None:
            self.trace.record(kind, request_id, token_ids=token_ids, first_position=first_position)
