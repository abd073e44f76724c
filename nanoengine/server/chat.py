"""``POST /v1/chat/completions``: a conversation in, the assistant's reply out.

The conversation is rendered by the chat template (the tokenizer's, or ``--chat-template``)
into one prompt; the ``n`` replies are that engine request's ``n`` sequences. Streaming
follows OpenAI: each choice opens with ``delta: {"role": "assistant", "content": ""}``,
then carries ``content`` deltas, and its last chunk has the ``finish_reason``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nanoengine.engine.inputs import Prompt, parse_prompts
from nanoengine.lora.request import LoRARequest
from nanoengine.outputs import CompletionOutput, RequestOutput
from nanoengine.sampling_params import SamplingParams
from nanoengine.server.context import ServingContext, new_id
from nanoengine.server.generation import collect, engine_streams, usage
from nanoengine.server.logprobs import chat_logprobs, prompt_logprobs_json
from nanoengine.server.protocol import ChatCompletionRequest, to_sampling_params
from nanoengine.server.streams import (
    SSE_DONE, ClientDisconnected, DeltaTracker, SSEResponse, error_event, run_unless_disconnected, sse,
)


def _logprobs(ctx: ServingContext, params: SamplingParams, c: CompletionOutput, first: int, last: int) -> dict | None:
    if params.logprobs is None or c.logprobs is None:
        return None
    return chat_logprobs(c.token_ids, c.logprobs, first, last, params.logprobs, ctx.tokenizer)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    """Check everything, then answer at once (JSON) or as a stream of events; ``model``
    names the base model or an adapter to run with (lesson 14), and the answer names it too."""
    lora = ctx.models.resolve(body.model)
    ctx.check_task("generate")
    info = ctx.info
    rendered = ctx.render_chat(body.messages, body.add_generation_prompt)
    prompts = parse_prompts(rendered, ctx.tokenizer, info.vocab_size, info.max_model_len)
    params = to_sampling_params(body, len(prompts[0].token_ids), info.max_model_len, info.vocab_size)
    request_id, created = new_id("chatcmpl"), int(time.time())
    admission = ctx.admit(1)
    if body.stream:
        return SSEResponse(_stream(ctx, body, prompts, params, request_id, created, lora),
                           on_close=admission.release)
    with admission:
        try:
            finals = await run_unless_disconnected(request, collect(ctx, prompts, [params], request_id, lora))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the request is already aborted
    final = finals[0]
    choices = [
        {"index": c.index, "message": {"role": "assistant", "content": c.text},
         "logprobs": _logprobs(ctx, params, c, 0, len(c.token_ids)), "finish_reason": c.finish_reason,
         "stop_reason": c.stop_reason}
        for c in sorted(final.outputs, key=lambda c: c.index)
    ]
    answer = {"id": request_id, "object": "chat.completion", "created": created, "model": body.model or ctx.model_name,
              "choices": choices, "usage": usage(finals)}
    if body.prompt_logprobs is not None:
        answer["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
    return JSONResponse(answer)


async def _stream(
    ctx: ServingContext, body: ChatCompletionRequest, prompts: list[Prompt], params: SamplingParams,
    request_id: str, created: int, lora_request: LoRARequest | None,
) -> AsyncIterator[str]:
    """The SSE body: every choice's role chunk, its content deltas and its finish, the
    usage if asked, then ``[DONE]``. An engine failure mid-stream becomes an error event."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": body.model or ctx.model_name}
    if body.include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: CompletionOutput | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish.finish_reason if finish else None}
        if finish is not None:
            choice["stop_reason"] = finish.stop_reason
        return sse({**head, "choices": [choice]})

    trackers = [DeltaTracker(params.stop, params.include_stop_str_in_output) for _ in range(params.n)]
    final: RequestOutput | None = None
    stream = engine_streams(ctx, prompts, [params], request_id, lora_request)
    try:
        for index in range(params.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for _, final in stream:
            for c in final.outputs:
                step = trackers[c.index].advance(c)
                if step is None:
                    continue
                text, first, last = step
                logprobs = _logprobs(ctx, params, c, first, last)
                finished = c.finish_reason is not None
                if not text and logprobs is None and not finished:
                    continue  # a token that completes no character yet
                yield chunk(c.index, {"content": text} if text else {}, logprobs, c if finished else None)
        if body.include_usage and final is not None:
            yield sse({**head, "choices": [], "usage": usage([final])})
    except Exception as exc:  # the response has started: the error can only be an event
        yield error_event(exc, request_id)
    finally:
        await stream.aclose()
    yield SSE_DONE
