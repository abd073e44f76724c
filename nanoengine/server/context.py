"""What every handler shares: the engine, the served models, the chat template, admission, metrics."""

from __future__ import annotations

import dataclasses
import uuid

from transformers import PreTrainedTokenizerBase

from nanoengine.engine.async_engine import AsyncEngine, EngineInfo
from nanoengine.engine.inputs import Prompt, render_chat
from nanoengine.server.errors import APIError
from nanoengine.server.metrics import ServerMetrics
from nanoengine.server.models import ServedModels
from nanoengine.server.protocol import ChatMessage, message_content


class Admission:
    """Places held in the queue; ``release`` (or leaving the ``with`` block) gives them back, once."""

    def __init__(self, context: ServingContext, count: int) -> None:
        self.context = context
        self.count = count

    def release(self) -> None:
        self.context.in_flight -= self.count
        self.count = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def new_id(prefix: str) -> str:
    """A response id in OpenAI's form (``cmpl-...``, ``chatcmpl-...``), unique across restarts."""
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclasses.dataclass(slots=True)
class ServingContext:
    """One app's state.

    Invariant: ``in_flight`` counts the engine requests this app has admitted and whose
    streams are still open; it is checked and raised without an ``await`` in between, so
    concurrent handlers cannot all slip past ``max_queued_requests`` together.
    """

    engine: AsyncEngine
    models: ServedModels
    chat_template: str | None
    max_queued_requests: int | None
    metrics: ServerMetrics
    in_flight: int = 0

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.info.tokenizer

    @property
    def model_name(self) -> str:
        """The base model's served name (``--served-model-name``, else the model's)."""
        return self.models.base_name

    def check_task(self, task: str) -> None:
        """400 unless the served model does ``task`` ("generate" or "embed", lesson 16): a
        route for the other kind says which model it needs."""
        if self.info.task == task:
            return
        if task == "generate":
            message = f"{self.model_name} is an embedding model: it does not generate text; use /v1/embeddings"
        else:
            message = (f"{self.model_name} generates text; it does not embed: start the server with an embedding "
                       "model (e.g. `nanoengine serve all-minilm-l6-v2`) or with --task embed")
        raise APIError(400, message, "model")

    def admit(self, count: int) -> Admission:
        """Hold ``count`` places in the queue until released; 503 if they would overflow it."""
        limit = self.max_queued_requests
        if limit is not None and self.in_flight + count > limit:
            raise APIError(503, f"the server is busy: {self.in_flight} requests in flight, at most {limit} "
                                "(--max-queued-requests); retry later")
        self.in_flight += count
        return Admission(self, count)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> Prompt:
        """The conversation as the model's prompt (``engine.inputs.render_chat``; images go
        through a multimodal model's processor); what it cannot render is a ValueError (a 400)."""
        if not messages:
            raise ValueError("messages must hold at least one message")
        conversation = [{"role": m.role, "content": message_content(m)} for m in messages]
        return render_chat(self.tokenizer, conversation, self.chat_template, add_generation_prompt,
                           self.engine.info.processor)
