"""Lesson 13: the engine in a process of its own, behind an asyncio interface.

A server spends its time on HTTP, JSON, tokenization and streaming; the engine spends its
time in model steps. In one Python process they would take turns under the GIL, and every
step would stall every open connection. So, as vLLM's engine core does, the step loop runs
in a separate process (:func:`run_engine_core`), and the server's process talks to it through
a pipe: requests and aborts go in, each step's outputs come back.

:class:`AsyncEngine` is the server's side. Each request gets an async iterator of
:class:`RequestOutput` snapshots. If its consumer stops early (the client went away), the
request is aborted in the engine at once, which frees its KV blocks before the next step.
Two threads keep the event loop from ever blocking on the pipe: one sends, one receives and
hands outputs to the right request's queue.

Data parallelism (lesson 12): ``data_parallel_size`` engine processes, each with the whole
model (or its own tensor-parallel world), serve behind the one front end. The sender puts
each new request on the replica with the fewest requests in flight and sends its aborts
there too; each replica has its own receiver thread.

LoRA adapters (lesson 14): a request may carry a :class:`LoRARequest`. Adding or removing an
adapter is a *utility call* (vLLM's name): sent to every replica, since any of them may get
a request for it, and answered by each; the caller awaits a future per replica, which the
receiver threads resolve.

Embedding models (lesson 16): an engine process that embeds (``LLM.task == "embed"``) has
no steps and no KV cache; it answers each ``embed`` utility call as it comes and refuses
requests to generate. It runs alone: ``data_parallel_size`` must be 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from transformers import PreTrainedTokenizerBase

from nanoengine.engine.inputs import Prompt
from nanoengine.engine.output_processor import TextStream
from nanoengine.lora.request import LoRARequest
from nanoengine.outputs import PositionLogprobs, RequestOutput
from nanoengine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("nanoengine")

# Put in a request's queue by ``abort``: the stream ends there.
_ABORTED = object()


@dataclasses.dataclass(slots=True)
class EngineInfo:
    """What the server needs to know about the loaded model, sent once it is ready
    (``num_blocks``: of all replicas together, 0 for an embedding model; ``enable_lora``:
    requests may name adapters; ``task``: "generate" or "embed", lesson 16; ``processor``: a
    multimodal model's, which turns images in chat messages into tokens, lesson 16)."""

    model_name: str
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    enable_lora: bool = False
    task: str = "generate"
    processor: object | None = None


@dataclasses.dataclass(slots=True)
class EngineMetrics:
    """The engine's state after its latest step (``num_used_blocks``: held by a request;
    cached free blocks are not counted)."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_used_blocks: int = 0
    prefix_cache_queried_blocks: int = 0
    prefix_cache_hit_blocks: int = 0
    num_preemptions: int = 0
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


def _snapshot(engine) -> EngineMetrics:
    kv, scheduler = engine.kv_cache_manager, engine.scheduler
    return EngineMetrics(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_blocks=kv.pool.num_blocks,
        num_used_blocks=kv.pool.num_blocks - kv.num_free_blocks,
        prefix_cache_queried_blocks=kv.stats.queried_blocks,
        prefix_cache_hit_blocks=kv.stats.hit_blocks,
        num_preemptions=scheduler.num_preemptions,
        spec_decode_num_drafts=engine.spec_stats.num_drafts,
        spec_decode_num_draft_tokens=engine.spec_stats.num_draft_tokens,
        spec_decode_num_accepted_tokens=engine.spec_stats.num_accepted_tokens,
    )


def merge_output(snapshot: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Bring a request's cumulative ``snapshot`` up to date with ``new`` (a ``DELTA`` output:
    see :class:`~nanoengine.sampling_params.RequestOutputKind`), in place, and return it.

    The engine process sends deltas because a cumulative snapshot grows with the request:
    sending one every step would cost time quadratic in its length."""
    by_index = {completion.index: completion for completion in snapshot.outputs}
    for completion in new.outputs:
        have = by_index.get(completion.index)
        if have is None:
            snapshot.outputs.append(completion)
            continue
        have.token_ids.extend(completion.token_ids)
        if completion.logprobs is not None:
            have.logprobs.extend(completion.logprobs)
        have.text, have.cumulative_logprob = completion.text, completion.cumulative_logprob
        have.finish_reason, have.stop_reason = completion.finish_reason, completion.stop_reason
    snapshot.finished, snapshot.metrics = new.finished, new.metrics
    return snapshot


class FrontendText:
    """The server's side of one request's text: the engine process sends token ids only.

    Detokenizing and matching stop strings here keeps that work off the engine's step loop
    (as vLLM's front end does). When a stop string ends a sequence, its later tokens from the
    engine (which ran on meanwhile) are dropped; the request's stream ends, and so its abort
    frees the engine's blocks, once every sequence has ended.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.streams: dict[int, TextStream] = {}
        self.counts: dict[int, int] = {}

    def apply(self, output: RequestOutput) -> RequestOutput:
        """Give ``output`` (new tokens only, a ``DELTA`` output) its text, in place."""
        kept = []
        for completion in output.outputs:
            stream = self.streams.get(completion.index)
            if stream is None:
                stream = self.streams[completion.index] = TextStream(self.tokenizer, self.prompt_token_ids, self.params)
            elif completion.index not in self.counts:
                continue  # ended on a stop string already
            self._add_tokens(stream, completion)
            self._name_tokens(completion.logprobs or [])
            kept.append(completion)
        self._name_tokens(output.prompt_logprobs[1:] if output.prompt_logprobs else [])
        output.outputs = kept
        return output

    def _add_tokens(self, stream: TextStream, completion) -> None:
        ended = completion.finish_reason is not None
        for i, token in enumerate(completion.token_ids):
            count = self.counts[completion.index] = self.counts.get(completion.index, 0) + 1
            last = ended and i == len(completion.token_ids) - 1
            stop = stream.add(token, count, last, last and completion.finish_reason == "stop")
            if stop is not None:
                if completion.logprobs is not None:
                    dropped = zip(completion.token_ids[i + 1 :], completion.logprobs[i + 1 :])
                    completion.cumulative_logprob -= sum(position[t].logprob for t, position in dropped)
                    completion.logprobs = completion.logprobs[: i + 1]
                completion.token_ids = completion.token_ids[: i + 1]
                completion.finish_reason, completion.stop_reason = "stop", stop
                del self.counts[completion.index]
                break
        completion.text = stream.text

    def _name_tokens(self, positions: list[PositionLogprobs | None]) -> None:
        for position in positions:
            for token, logprob in (position or {}).items():
                logprob.decoded_token = self.tokenizer.decode([token])


def run_engine_core(model: str | None, llm_kwargs: dict, conn: Connection) -> None:
    """The engine process: load the model, then step while there is work.

    Messages in: ``("add", request_id, prompt, params, lora_request)`` (``lora_request``:
    a :class:`LoRARequest` or None), ``("abort", request_id)``, ``("utility", call_id,
    method, args)`` (runs ``llm.<method>(*args)``: ``add_lora`` or ``remove_lora``,
    lesson 14, ``embed``, lesson 16), ``("shutdown",)``. Messages out:
    ``("ready", EngineInfo)`` or ``("failed", message)`` once, then ``("outputs",
    [RequestOutput], EngineMetrics)`` after every step or abort (each output carries only
    what is new since the last one: requests run with ``output_kind=DELTA``), ``("error", request_id,
    message)`` for a request the engine refused, ``("utility", call_id, result, message)``
    for every utility call (``message``: None, or why it failed), or ``("fatal", message)``
    once, if a rank of its parallel world failed (lesson 12). Waits on the pipe when idle,
    polls it between steps when busy. An embedding model's process runs
    :func:`_serve_embeddings` instead.
    """
    from nanoengine.llm import LLM
    from nanoengine.model.bundled import bundled_names
    from nanoengine.parallel.executor import WorkerFailure

    try:
        llm = LLM(model, **llm_kwargs)
    except Exception as exc:  # report why, the caller raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    loaded = llm.loaded
    # a bundled model answers to the name it was asked by (MiniLM's weights sit in a folder called "model")
    name = model if model in bundled_names() else loaded.path.name
    if llm.task == "embed":
        conn.send(("ready", EngineInfo(name, loaded.tokenizer, loaded.max_model_len, loaded.hf_config.vocab_size,
                                       0, 0, task="embed")))
        _serve_embeddings(llm, conn, name)
        return
    engine = llm.llm_engine
    conn.send(("ready", EngineInfo(
        name, loaded.tokenizer, loaded.max_model_len, loaded.hf_config.vocab_size,
        engine.kv_cache_manager.pool.num_blocks, engine.kv_cache_manager.block_size,
        bool(llm_kwargs.get("enable_lora")), processor=loaded.processor,
    )))
    while True:
        try:
            while not engine.has_unfinished_requests() or conn.poll():
                message = conn.recv()
                if message[0] == "shutdown":
                    llm.shutdown()
                    return
                if message[0] == "add":
                    _, request_id, prompt, params, lora_request = message
                    try:
                        engine.add_request(request_id, prompt, params, lora_request=lora_request)
                    except ValueError as exc:
                        conn.send(("error", request_id, str(exc)))
                elif message[0] == "utility":
                    _, call_id, method, args = message
                    conn.send(("utility", call_id, *_run_utility(llm, method, args)))
                elif message[0] == "abort":
                    engine.abort_request(message[1])
                    conn.send(("outputs", [], _snapshot(engine)))
        except (EOFError, OSError):  # the server's process is gone
            llm.shutdown()
            return
        try:
            outputs = engine.step()
        except WorkerFailure as failure:
            with contextlib.suppress(OSError):
                conn.send(("fatal", str(failure)))
            llm.shutdown()
            return
        try:
            conn.send(("outputs", outputs, _snapshot(engine)))
        except OSError:  # the server's process went away mid-step (it was stopped)
            llm.shutdown()
            return


def _serve_embeddings(llm, conn: Connection, name: str) -> None:
    """An embedding model's process: nothing to step, so it waits on the pipe and answers
    each message as it comes. An ``embed`` call is answered with its vectors (or why its
    prompts were refused), a request to generate with an ``error``; an abort has nothing
    to stop."""
    try:
        while True:
            message = conn.recv()
            if message[0] == "shutdown":
                return
            if message[0] == "add":
                conn.send(("error", message[1], f"{name} is an embedding model: it does not generate text"))
            elif message[0] == "utility":
                _, call_id, method, args = message
                conn.send(("utility", call_id, *_run_utility(llm, method, args)))
    except (EOFError, OSError):  # the server's process is gone
        return


def _run_utility(llm, method: str, args: tuple) -> tuple[object, str | None]:
    """``llm.<method>(*args)``'s result and None, or None and why it failed.

    Any exception is answered, not raised: an adapter or prompt the engine refuses (a
    ValueError naming the problem, the usual failure) or anything unforeseen must not stop
    the process and every request in it.
    """
    try:
        return getattr(llm, method)(*args), None
    except ValueError as exc:
        return None, str(exc)
    except Exception as exc:  # unforeseen: answered with its type, the process goes on
        return None, f"{type(exc).__name__}: {exc}"


def _settle(future: asyncio.Future, outcome: object) -> None:
    """Set a utility call's future (on its loop) unless its caller cancelled it. An exception
    is its *result*, raised by the caller: a future's own exception would be reported as
    never retrieved when another replica's failure is raised first."""
    if not future.done():
        future.set_result(outcome)


@dataclasses.dataclass(slots=True, eq=False)
class _Replica:
    """One engine process: its pipe, its latest metrics, how many requests it was given, and
    why it stopped (None: it runs)."""

    process: multiprocessing.Process
    conn: Connection
    metrics: EngineMetrics
    num_requests: int = 0
    dead: str | None = None


def _start_replica(model: str | None, llm_kwargs: dict, index: int) -> tuple[multiprocessing.Process, Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    # A daemonic process may not start processes of its own, and an engine with parallel ranks
    # spawns them: that engine is a plain child, which exits when the server's pipe closes.
    ranks = llm_kwargs.get("tensor_parallel_size", 1) * llm_kwargs.get("pipeline_parallel_size", 1)
    process = context.Process(target=run_engine_core, args=(model, llm_kwargs, theirs),
                              name=f"nanoengine-core{index or ''}", daemon=ranks == 1)
    process.start()
    theirs.close()
    return process, ours


class AsyncEngine:
    """The server's handle on the engine process (or on each data-parallel replica).

    Invariants: ``_streams`` holds a queue for every request submitted and not yet finished
    or abandoned; ``_owner`` maps each request the engines may still be running to its
    replica; ``_calls`` holds a future for every utility call and replica still to answer
    it, and each is resolved once, by whoever pops it; every message to an engine goes
    through the sender thread, every message from one through its replica's receiver
    thread, so no coroutine ever waits on a pipe.
    """

    def __init__(self, replicas: list[tuple[multiprocessing.Process, Connection]], info: EngineInfo) -> None:
        self.info = info
        self._replicas = [_Replica(process, conn, EngineMetrics(num_blocks=info.num_blocks // len(replicas)))
                          for process, conn in replicas]
        self._owner: dict[str, _Replica] = {}
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[tuple[int, _Replica], asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._send_loop, name="nanoengine-send", daemon=True).start()
        for replica in self._replicas:
            threading.Thread(target=self._receive_loop, args=(replica,), name="nanoengine-receive", daemon=True).start()

    @classmethod
    def start(cls, model: str | None = None, data_parallel_size: int = 1, **llm_kwargs) -> AsyncEngine:
        """Spawn ``data_parallel_size`` engine processes, each running ``LLM(model, **llm_kwargs)``,
        and wait until every one has loaded its model (an embedding model runs in one)."""
        started = [_start_replica(model, llm_kwargs, i) for i in range(data_parallel_size)]
        infos = []
        for process, conn in started:
            try:
                message = conn.recv()
            except EOFError:
                process.join()
                message = ("exited", f"the engine process exited while loading (exit code {process.exitcode})")
            if message[0] == "ready" and message[1].task == "embed" and data_parallel_size > 1:
                message = ("failed", (f"{message[1].model_name} is an embedding model, served by one engine "
                                      f"process: data_parallel_size must be 1; got {data_parallel_size}"))
            if message[0] != "ready":
                for other, other_conn in started:
                    other.kill()
                    other.join()
                if message[0] == "exited":
                    raise RuntimeError(message[1])
                raise ValueError(f"the engine could not start: {message[1]}")
            infos.append(message[1])
        info = dataclasses.replace(infos[0], num_blocks=sum(i.num_blocks for i in infos))
        return cls(started, info)

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            for replica in self._targets(message):
                try:
                    replica.conn.send(message)
                except (OSError, ValueError):
                    pass
                if message[0] == "utility" and replica.dead is not None:  # its receiver may be past its sweep
                    self._answer(message[1], replica, RuntimeError(replica.dead))
            if message[0] == "shutdown":
                return

    def _targets(self, message: tuple) -> list[_Replica]:
        """The replicas ``message`` goes to: every one for a shutdown, those with a future
        waiting for a utility call, the least loaded for a new request, its owner (if any)
        for an abort."""
        if message[0] == "shutdown":
            return self._replicas
        if message[0] == "utility":
            return [replica for replica in self._replicas if (message[1], replica) in self._calls]
        if message[0] == "add":
            return self._place(message[1])
        owner = self._owner.pop(message[1], None)  # abort: only its replica has it (none: it finished already)
        return [owner] if owner is not None else []

    def _place(self, request_id: str) -> list[_Replica]:
        """Give a new request to the live replica with the fewest requests in flight; none
        lives: the request fails."""
        load = {replica: 0 for replica in self._replicas if replica.dead is None}
        for owner in list(self._owner.values()):
            if owner in load:
                load[owner] += 1
        if not load:
            self._deliver(request_id, RuntimeError(self._dead_reason()))
            return []
        replica = self._owner[request_id] = min(load, key=load.get)
        replica.num_requests += 1
        return [replica]

    def _receive_loop(self, replica: _Replica) -> None:
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                message = ("fatal", "the engine process stopped")
            if message[0] == "fatal":
                replica.dead = message[1]
                for request_id, owner in list(self._owner.items()):
                    if owner is replica:
                        self._owner.pop(request_id, None)
                        self._deliver(request_id, RuntimeError(replica.dead))
                for call_id, owner in list(self._calls):
                    if owner is replica:
                        self._answer(call_id, replica, RuntimeError(replica.dead))
                return
            if message[0] == "outputs":
                _, outputs, replica.metrics = message
                for output in outputs:
                    if output.finished:
                        self._owner.pop(output.request_id, None)
                    self._deliver(output.request_id, output)
            elif message[0] == "error":
                self._owner.pop(message[1], None)
                self._deliver(message[1], ValueError(message[2]))
            elif message[0] == "utility":
                _, call_id, result, failure = message
                self._answer(call_id, replica, result if failure is None else ValueError(failure))

    def _dead_reason(self) -> str:
        return "; ".join(sorted({r.dead for r in self._replicas if r.dead})) or "the engine process stopped"

    @property
    def _dead(self) -> str | None:
        """Why the engine can take no more requests (every replica stopped), or None."""
        return self._dead_reason() if all(r.dead for r in self._replicas) else None

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, items = stream
            loop.call_soon_threadsafe(items.put_nowait, item)

    def _answer(self, call_id: int, replica: _Replica, outcome: object) -> None:
        """Resolve ``replica``'s future of a utility call with its result or exception, once
        (from any thread; a caller that gave up has popped its futures already)."""
        future = self._calls.pop((call_id, replica), None)
        if future is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed: nobody waits
                future.get_loop().call_soon_threadsafe(_settle, future, outcome)

    async def _utility(self, method: str, *args: object) -> list:
        """Run ``engine.<method>(*args)`` in every live replica; their results, in order.

        The first failure is raised once every replica has answered (ValueError: the
        engine's message; RuntimeError: a replica stopped).
        """
        if self._dead:
            raise RuntimeError(self._dead)
        loop, call_id = asyncio.get_running_loop(), next(self._call_ids)
        keys = [(call_id, replica) for replica in self._replicas if replica.dead is None]
        futures = [loop.create_future() for _ in keys]
        self._calls.update(zip(keys, futures))
        self._outbox.put(("utility", call_id, method, args))
        try:
            outcomes = await asyncio.gather(*futures)
        finally:
            for key in keys:  # answers still to come (a cancelled caller) are dropped
                self._calls.pop(key, None)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter in every replica now (lesson 14); False: every replica
        had it already. A bad adapter raises ValueError naming the problem."""
        return any(await self._utility("add_lora", lora_request))

    async def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter in every replica (False: none knew it). Requests still running
        with it finish with it: each engine keeps its weights until they end."""
        return any(await self._utility("remove_lora", lora_id))

    async def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """One vector per token-id list, in order (lesson 16), from the engine process of an
        embedding model (there is one: :meth:`start` refuses more). Prompts the engine
        refuses (empty, ids outside the vocabulary, too long) raise ValueError naming the
        problem, before any is embedded."""
        prompts = [{"prompt_token_ids": ids} for ids in token_id_lists]
        (outputs,) = await self._utility("embed", prompts, False)  # False: no progress bar in the engine's log
        return [output.outputs.embedding for output in outputs]

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str, lora_request: LoRARequest | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request (run with adapter ``lora_request``, if given) and yield its outputs
        as they come (the last is ``finished``).

        Stopping early (``break``, ``aclose``, cancellation) aborts the request. The loop
        (task L13.T1) waits on the request's queue: the ``_ABORTED`` marker ends the stream
        quietly, an exception (a refused request, a dead engine) is raised, and an output (only
        what is new: a ``DELTA`` output) gets its text (:class:`FrontendText`) and is merged
        into the request's cumulative snapshot, which is yielded; the loop ends once the engine
        finished the request or every sequence ended (a stop string). The snapshot is one
        object, updated in place from step to step: copy what you need to keep. However the
        loop ends, the request's queue leaves ``_streams``, and a request the engine did not
        finish is aborted there.
        """
        if self._dead:
            raise RuntimeError(self._dead)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.output_kind != RequestOutputKind.CUMULATIVE:
            raise ValueError(f"AsyncEngine.generate yields the request so far at every step; output_kind "
                             f"{params.output_kind.name} is not offered here")
        items: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), items)
        text = None
        if params.detokenize:  # the engine sends tokens; text and stop strings are made here
            text = FrontendText(self.info.tokenizer, prompt.token_ids, params)
            params = dataclasses.replace(params, stop=[], detokenize=False)
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)  # see merge_output
        self._outbox.put(("add", request_id, prompt, params, lora_request))
        engine_finished, snapshot = False, None
        # BEGIN SOLUTION L13.T1
        try:
            while snapshot is None or not snapshot.finished:
                item = await items.get()
                if item is _ABORTED:
                    return
                if isinstance(item, Exception):
                    engine_finished = True  # the engine never took it, or is gone: nothing to abort
                    raise item
                engine_finished = item.finished
                item = text.apply(item) if text is not None else item
                snapshot = item if snapshot is None else merge_output(snapshot, item)
                snapshot.finished = engine_finished or all(c.finish_reason for c in snapshot.outputs)
                yield snapshot
        finally:
            del self._streams[request_id]
            if not engine_finished:  # abandoned, aborted, or ended on stop strings: free the engine's blocks
                self._outbox.put(("abort", request_id))
        # END SOLUTION
        # BEGIN STUB
        # if False:  # never runs: its `yield` keeps generate an async generator until your loop yields
        #     yield snapshot
        # END STUB

    async def abort(self, request_id: str) -> None:
        """Stop a request now; its stream ends without a finished output."""
        self._outbox.put(("abort", request_id))
        self._deliver(request_id, _ABORTED)

    def metrics(self) -> EngineMetrics:
        """Every replica's latest metrics, summed."""
        total = EngineMetrics()
        for replica in self._replicas:
            for field in dataclasses.fields(EngineMetrics):
                setattr(total, field.name, getattr(total, field.name) + getattr(replica.metrics, field.name))
        return total

    def is_healthy(self) -> bool:
        return all(r.dead is None and r.process.is_alive() for r in self._replicas)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        """Stop the engine process (waits a few seconds, then kills it)."""
        self._outbox.put(("shutdown",))
        for replica in self._replicas:
            replica.process.join(timeout=5)
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join()
