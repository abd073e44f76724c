"""``POST /v1/completions``: text in, text out, OpenAI's legacy completions shape.

A list of prompts becomes one engine request per prompt; the choices are numbered across
prompts and samples (``prompt_index * n + sample_index``), as OpenAI numbers them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nanoengine.engine.inputs import Prompt, parse_prompts
from nanoengine.lora.request import LoRARequest
from nanoengine.outputs import RequestOutput
from nanoengine.sampling_params import SamplingParams
from nanoengine.server.context import ServingContext, new_id
from nanoengine.server.generation import collect, engine_streams, usage
from nanoengine.server.logprobs import CompletionLogprobs, prompt_logprobs_json
from nanoengine.server.protocol import CompletionRequest, to_sampling_params
from nanoengine.server.streams import (
    SSE_DONE, ClientDisconnected, DeltaTracker, SSEResponse, error_event, run_unless_disconnected, sse,
)


def _prompt_inputs(prompt: str | list) -> str | list:
    """OpenAI's prompt forms as :func:`parse_prompts` takes them (token ids become dicts)."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise ValueError("prompt must not be empty")
    if isinstance(prompt[0], int):
        return {"prompt_token_ids": prompt}
    if isinstance(prompt[0], list):
        return [{"prompt_token_ids": ids} for ids in prompt]
    return prompt


def _prompt_text(ctx: ServingContext, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else ctx.tokenizer.decode(prompt.token_ids)


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    """Check everything, then answer at once (JSON) or as a stream of events; ``model``
    names the base model or an adapter to run with (lesson 14), and the answer names it too."""
    lora = ctx.models.resolve(body.model)
    ctx.check_task("generate")
    if body.echo and body.logprobs is not None:
        raise ValueError("echo together with logprobs is not supported")
    info = ctx.info
    prompts = parse_prompts(_prompt_inputs(body.prompt), ctx.tokenizer, info.vocab_size, info.max_model_len)
    params = [to_sampling_params(body, len(p.token_ids), info.max_model_len, info.vocab_size) for p in prompts]
    request_id, created = new_id("cmpl"), int(time.time())
    admission = ctx.admit(len(prompts))
    if body.stream:
        return SSEResponse(_stream(ctx, body, prompts, params, request_id, created, lora),
                           on_close=admission.release)
    with admission:
        try:
            finals = await run_unless_disconnected(request, collect(ctx, prompts, params, request_id, lora))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the requests are already aborted
    choices = []
    for i, (prompt, final) in enumerate(zip(prompts, finals)):
        echo = _prompt_text(ctx, prompt) if body.echo else ""
        for c in sorted(final.outputs, key=lambda c: c.index):
            logprobs = None
            if body.logprobs is not None and c.logprobs is not None:
                table = CompletionLogprobs(ctx.tokenizer, body.logprobs)
                logprobs = table.take(c.token_ids, c.logprobs, 0, len(c.token_ids))
            choice = {"index": i * body.n + c.index, "text": echo + c.text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
            choices.append(choice)
    return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                         "model": body.model or ctx.model_name, "choices": choices, "usage": usage(finals)})


class _ChoiceStream:
    """One choice's streaming state: what was sent, and the echoed prompt still to send."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, params: SamplingParams, echo: str) -> None:
        self.delta = DeltaTracker(params.stop, params.include_stop_str_in_output)
        self.logprobs = None if body.logprobs is None else CompletionLogprobs(ctx.tokenizer, body.logprobs, len(echo))
        self.echo = echo


async def _stream(
    ctx: ServingContext, body: CompletionRequest, prompts: list[Prompt], params: list[SamplingParams],
    request_id: str, created: int, lora_request: LoRARequest | None,
) -> AsyncIterator[str]:
    """The SSE body: a chunk per choice whenever its text grows or it ends, the usage if
    asked, then ``[DONE]``. An engine failure mid-stream becomes an error event."""
    head = {"id": request_id, "object": "text_completion", "created": created, "model": body.model or ctx.model_name}
    if body.include_usage:
        head["usage"] = None
    choices: dict[int, _ChoiceStream] = {}
    finals: list[RequestOutput | None] = [None] * len(prompts)
    stream = engine_streams(ctx, prompts, params, request_id, lora_request)
    try:
        async for i, output in stream:
            finals[i] = output
            for c in output.outputs:
                index = i * body.n + c.index
                if index not in choices:
                    echo = _prompt_text(ctx, prompts[i]) if body.echo else ""
                    choices[index] = _ChoiceStream(ctx, body, params[i], echo)
                state = choices[index]
                step = state.delta.advance(c)
                if step is None:
                    continue
                text, first, last = step
                logprobs = None
                if state.logprobs is not None and c.logprobs is not None:
                    logprobs = state.logprobs.take(c.token_ids, c.logprobs, first, last)
                text, state.echo = state.echo + text, ""
                if not text and logprobs is None and c.finish_reason is None:
                    continue  # a token that completes no character yet
                yield sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]})
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": usage(finals)})  # type: ignore[arg-type]
    except Exception as exc:  # the response has started: the error can only be an event
        yield error_event(exc, request_id)
    finally:
        await stream.aclose()
    yield SSE_DONE
