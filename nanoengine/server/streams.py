"""Engine streams as HTTP sees them: merged, cut short when the client leaves, sent as SSE.

The engine gives one async iterator per request; closing it early aborts the request and
frees its KV blocks. Everything here exists to make sure that happens *at once* whenever
nobody is listening any more:

* :func:`merge` runs several engine streams (a completion with a list of prompts) as one
  and closes all of them when it is closed;
* :func:`run_unless_disconnected` races a non-streaming handler against the client's
  disconnect, which Starlette would otherwise only notice when writing the response;
* :class:`SSEResponse` closes its body generator however the response ends, instead of
  leaving a suspended generator (and its engine request) to the garbage collector.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nanoengine.outputs import CompletionOutput
from nanoengine.server.errors import error_body, value_error_param

logger = logging.getLogger("nanoengine")

T = TypeVar("T")
_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of all ``streams`` as they arrive, tagged with their stream's position.

    An exception from any stream ends the merge with that exception; closing the merge
    (or cancelling its consumer) closes every stream, which aborts their engine requests.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, _END))
        except Exception as exc:  # handed to the consumer, who raises it
            queue.put_nowait((i, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its requests were aborted."""


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (aborting its engine
    requests through their streams' ``finally``) and raise :class:`ClientDisconnected`."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        for task in (work_task, watcher):
            task.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response whose body generator is always closed at the end,
    and ``on_close`` called, however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type=self.media_type, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:  # also when the body never started (so never ran its finally)
                    self.on_close()


def sse(data: dict | str) -> str:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


def error_event(exc: Exception, request_id: str) -> str:
    """An error after a streamed response has started, as its last event: 400 for a request
    the engine refused, 500 (logged) for anything else."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ValueError):
        return sse(error_body(400, message, value_error_param(message)))
    logger.exception("error while streaming %s", request_id)
    return sse(error_body(500, f"internal error: {type(exc).__name__}: {message}"))


class DeltaTracker:
    """What of one choice's cumulative text and tokens has been streamed.

    Invariant: the text sent so far is a prefix of every later snapshot's text. The
    engine's text grows by appending, except that a stop string, once matched, is cut off;
    so while a choice with stop strings runs, its last ``max(len(stop)) - 1`` characters
    (a possible start of a stop string) are held back until the next token settles them.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        self.holdback = max((len(s) for s in stop), default=1) - 1 if stop and not include_stop_str_in_output else 0
        self.sent_chars = 0
        self.sent_tokens = 0
        self.done = False

    def advance(self, completion: CompletionOutput) -> tuple[str, int, int] | None:
        """The new text and the range of new token positions, or None if nothing is new."""
        if self.done:
            return None
        finished = completion.finish_reason is not None
        end = len(completion.text) if finished else max(self.sent_chars, len(completion.text) - self.holdback)
        text = completion.text[self.sent_chars : end]
        first, last = self.sent_tokens, len(completion.token_ids)
        if not text and first == last and not finished:
            return None
        self.sent_chars, self.sent_tokens, self.done = end, last, finished
        return text, first, last
