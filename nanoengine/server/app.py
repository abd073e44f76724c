"""The FastAPI app: OpenAI's routes plus vLLM's operational ones, over one :class:`AsyncEngine`.

``build_app`` only wires things together: each route's work lives in its own module
(:mod:`.completions`, :mod:`.chat`, :mod:`.embeddings`, :mod:`.metrics`, the served models
and LoRA adapters in :mod:`.models`), errors in :mod:`.errors`, the key check in
:mod:`.auth`. The app keeps its state (engine, served models, metrics registry, admission
count) in one :class:`ServingContext`, so several apps can live in one process.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from nanoengine import __version__
from nanoengine.engine.async_engine import AsyncEngine
from nanoengine.server.auth import APIKeyMiddleware
from nanoengine.server.chat import create_chat_completion
from nanoengine.server.completions import create_completion
from nanoengine.server.context import ServingContext
from nanoengine.server.embeddings import create_embedding
from nanoengine.server.errors import APIError, error_response, install_error_handlers
from nanoengine.server.metrics import ServerMetrics
from nanoengine.server.models import ServedModels
from nanoengine.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, LoadLoRAAdapterRequest,
    TokenizeRequest, UnloadLoRAAdapterRequest,
)


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    max_queued_requests: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``'s model as ``served_model_name``.

    ``api_key``: required as ``Authorization: Bearer KEY`` on ``/v1/*``, ``/tokenize`` and
    ``/detokenize``. ``chat_template``: a Jinja template used instead of the tokenizer's.
    ``max_queued_requests``: engine requests in flight beyond which new ones get 503.
    """
    if max_queued_requests is not None and max_queued_requests < 1:
        raise ValueError(f"max_queued_requests must be a positive integer; got {max_queued_requests}")
    name = served_model_name or engine.info.model_name
    metrics = ServerMetrics(engine.metrics, engine.info.block_size, name)
    models = ServedModels(engine, name, int(time.time()))
    ctx = ServingContext(engine, models, chat_template, max_queued_requests, metrics)
    app = FastAPI(title="nanoengine", version=__version__)
    app.state.context = ctx
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": models.cards()}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict:
        return models.card(model)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        await models.load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        await models.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await create_embedding(ctx, body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        models.resolve(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if body.messages is not None:
            tokens = ctx.render_chat(body.messages, body.add_generation_prompt).token_ids
        else:
            tokens = ctx.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        models.resolve(body.model)
        vocab = engine.info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens has ids outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            return error_response(503, "the engine process has stopped")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    return app
