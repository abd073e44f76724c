"""Running one HTTP request's prompts on the engine: one engine request per prompt.

Completions and chat completions differ only in how they build prompts and shape the
answer; submitting, collecting, counting tokens and recording metrics are the same and
live here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from nanoengine.engine.inputs import Prompt
from nanoengine.lora.request import LoRARequest
from nanoengine.outputs import RequestOutput
from nanoengine.sampling_params import SamplingParams
from nanoengine.server.context import ServingContext
from nanoengine.server.streams import merge


def engine_streams(
    ctx: ServingContext, prompts: list[Prompt], params: list[SamplingParams], request_id: str,
    lora_request: LoRARequest | None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The prompts' outputs (each run with adapter ``lora_request``, if any) as they come,
    tagged with the prompt's position; each finished output is recorded in the metrics.
    Closing the iterator aborts whatever still runs."""
    streams = [ctx.engine.generate(p, sp, f"{request_id}-{i}", lora_request)
               for i, (p, sp) in enumerate(zip(prompts, params))]
    return _recorded(ctx, merge(streams))


async def _recorded(
    ctx: ServingContext, merged: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    try:
        async for i, output in merged:
            if output.finished:
                ctx.metrics.observe_finished(output)
            yield i, output
    finally:
        await merged.aclose()


async def collect(ctx: ServingContext, prompts: list[Prompt], params: list[SamplingParams],
                  request_id: str, lora_request: LoRARequest | None) -> list[RequestOutput]:
    """Every prompt's final output, in the prompts' order."""
    finals: list[RequestOutput | None] = [None] * len(prompts)
    stream = engine_streams(ctx, prompts, params, request_id, lora_request)
    try:
        async for i, output in stream:
            finals[i] = output
    finally:
        await stream.aclose()
    if any(f is None or not f.finished for f in finals):
        raise RuntimeError("the engine ended a request without finishing it")
    return finals  # type: ignore[return-value]


def usage(finals: list[RequestOutput]) -> dict:
    """OpenAI's ``usage``: prompt tokens once per prompt, completion tokens over every choice."""
    prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
