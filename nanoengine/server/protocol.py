"""The OpenAI request bodies the server accepts, and how each becomes a :class:`SamplingParams`.

Field names, types and defaults follow OpenAI's API plus vLLM's extras (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ...), so any OpenAI client works
unchanged. The models check *types* only (strictly: ``"2"`` is not a number, ``true`` is
not an integer) and refuse every field they do not define (``tools``, ``response_format``,
``best_of``, ``suffix``, a misspelled name, ...) with a 400 naming it: a field the server
would not act on is never dropped silently (a client that asked for JSON or offered a tool
would otherwise get free text and no error). The *values* are checked once,
by :class:`SamplingParams` and the engine's prompt checks, so the server and the offline
API refuse exactly the same things with the same messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from nanoengine.engine.inputs import check_params_for_model
from nanoengine.sampling_params import SamplingParams

# OpenAI's limits: at most 128 choices and 20 top logprobs per position. They also keep a
# single request from asking the engine for an unbounded amount of work.
MAX_N = 128
MAX_LOGPROBS = 20


class _Body(BaseModel):
    """Strict types, unknown fields refused, no NaN or infinity (JSON has neither, but
    Python's parser accepts ``NaN``), no lone surrogates (JSON's ``"\\ud800"`` escape makes
    a string that is not Unicode, which a tokenizer cannot take)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        if _has_surrogate(data):
            raise ValueError("the body holds a string that is not valid Unicode (a lone surrogate escape)")
        return data


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The fields completions and chat completions share."""

    model: str | None = None  # None: the served model (vLLM accepts its absence too)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a prompt is text, token ids, or a list of either."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default; None: up to the context length
    logprobs: int | None = None
    echo: bool = False


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    """A part of a message's content: ``text``, or ``image_url`` (a multimodal model, lesson 16)."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; ``max_tokens`` None means up to the context length (vLLM)."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    """``POST /tokenize``: a prompt (special tokens added, as for a completion) or messages
    (rendered by the chat template, as for a chat completion)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings`` (lesson 16): ``input`` is a text, token ids, or a list of
    either; ``encoding_format`` "base64" sends each vector as little-endian float32 bytes
    (what the ``openai`` client asks for). ``dimensions`` (a shortened vector) is accepted
    only as None: no served model is trained for it."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class LoadLoRAAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's): serve the PEFT adapter at ``lora_path`` as
    ``lora_name``."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter`` (vLLM's): stop serving ``lora_name``."""

    lora_name: str


def message_content(message: ChatMessage) -> str | list[dict]:
    """A message's content as the chat template takes it: one string, its text parts joined
    by newlines (as vLLM); or, when it has images, the list of parts in OpenAI's shape."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    for part in message.content:
        if part.type not in ("text", "image_url"):
            raise ValueError(f"content parts of type {part.type!r} are not supported; only 'text' and 'image_url'")
        if (part.type == "text") != (part.text is not None) or (part.type == "image_url") != (part.image_url is not None):
            raise ValueError(f"a content part of type {part.type!r} needs a {part.type!r} field, and only that")
    if all(part.type == "text" for part in message.content):
        return "\n".join(part.text for part in message.content)
    return [{"type": "text", "text": part.text} if part.type == "text" else
            {"type": "image_url", "image_url": {"url": part.image_url.url}} for part in message.content]


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The output budget: what was asked, which must fit the context, or all the context left."""
    if requested is None:
        return max_model_len - prompt_len
    if isinstance(requested, int) and requested >= 1 and prompt_len + requested > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
            "Please reduce the length of the prompt or completion."
        )
    return requested


def _logprobs(request: SamplingFields) -> int | None:
    if isinstance(request, CompletionRequest):
        count, name = request.logprobs, "logprobs"
    else:
        assert isinstance(request, ChatCompletionRequest)
        if request.top_logprobs is not None and not request.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        count, name = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]; got {count}")
    return count


def to_sampling_params(
    request: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int, vocab_size: int
) -> SamplingParams:
    """The engine's parameters for one prompt of ``request``; ValueError names a bad field.

    Defaults are vLLM's server defaults: temperature 1, no truncation, completions 16 tokens,
    chat up to the end of the context.
    """
    if isinstance(request, ChatCompletionRequest):
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    else:
        requested = request.max_tokens
    if not 1 <= request.n <= MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}]; got {request.n}")
    if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]; got {request.prompt_logprobs}")
    if request.prompt_logprobs is not None and request.stream:
        raise ValueError("prompt_logprobs is not available when stream is true")
    params = SamplingParams(
        n=request.n,
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        temperature=_or(request.temperature, 1.0),
        top_p=_or(request.top_p, 1.0),
        top_k=_or(request.top_k, 0),
        min_p=_or(request.min_p, 0.0),
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos,
        max_tokens=_max_tokens(requested, prompt_len, max_model_len),
        min_tokens=request.min_tokens,
        logprobs=_logprobs(request),
        prompt_logprobs=request.prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        logit_bias=request.logit_bias,
    )
    check_params_for_model(params, vocab_size)
    return params


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
