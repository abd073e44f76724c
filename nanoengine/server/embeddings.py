"""``POST /v1/embeddings`` (lesson 16): texts in, one vector each out, OpenAI's shape.

The texts are tokenized here, as for a completion, so the usage counts what the model
read; the engine process checks the token ids (vocabulary, the model's length limit) and
embeds them all in one call, or refuses them all with the reason. Nothing is generated,
so the answer comes whole: no stream, no sampling fields.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi.responses import JSONResponse

from nanoengine.server.context import ServingContext
from nanoengine.server.errors import APIError
from nanoengine.server.protocol import EmbeddingRequest


def _token_id_lists(ctx: ServingContext, inputs: str | list) -> list[list[int]]:
    """OpenAI's input forms (a text, token ids, or a list of either) as one token-id list
    per input; texts get the model's special tokens, as its tokenizer adds them."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input must not be empty", "input")
    lists = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:  # the tokenizer would make it [CLS] [SEP]: a vector of nothing
                raise APIError(400, f"input: prompt {i} is an empty string", "input")
            item = ctx.tokenizer(item)["input_ids"]
        lists.append(item)
    return lists


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as JSON numbers, or as base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_embedding(ctx: ServingContext, body: EmbeddingRequest) -> JSONResponse:
    """Check the request, embed every input in one engine call, answer with the vectors in
    input order and the prompt tokens read. The call holds one place in the queue."""
    ctx.models.resolve(body.model)
    ctx.check_task("embed")
    if body.dimensions is not None:
        raise APIError(400, f"{ctx.model_name} does not support dimensions (it was not trained to shorten its "
                            "vectors); leave the field out", "dimensions")
    token_id_lists = _token_id_lists(ctx, body.input)
    with ctx.admit(1):
        try:
            vectors = await ctx.engine.embed(token_id_lists)
        except ValueError as exc:  # the engine's prompt checks, naming the prompt and the problem
            raise APIError(400, f"input: {exc}", "input") from None
    num_tokens = sum(map(len, token_id_lists))
    ctx.metrics.observe_embedded(num_tokens)
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": body.model or ctx.model_name,
                         "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})
