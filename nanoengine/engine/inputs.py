"""Prompts as users give them (vLLM's forms), checked and turned into token ids before any work."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from nanoengine.lora.request import LoRARequest
from nanoengine.request import Request
from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class Prompt:
    """A prompt's text (None when given as ids) and its token ids."""

    text: str | None
    token_ids: list[int]


def _as_list(prompts: object) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be a string, a dict with prompt_token_ids, or a list of those; got {type(prompts).__name__}")


def parse_prompts(
    prompts: object, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_model_len: int
) -> list[Prompt]:
    """Tokenize and check every prompt: non-empty, ids in the vocabulary, shorter than the context."""
    parsed = []
    for i, item in enumerate(_as_list(prompts)):
        if isinstance(item, str):
            prompt = Prompt(item, tokenizer(item)["input_ids"])
        elif isinstance(item, dict) and "prompt_token_ids" in item:
            ids = item["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"prompt {i}: prompt_token_ids must be a list of integers")
            prompt = Prompt(item.get("prompt"), list(ids))
        else:
            raise ValueError(f"prompt {i} must be a string or a dict with 'prompt_token_ids'; got {item!r:.80}")
        if not prompt.token_ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(prompt.token_ids) >= max_model_len:
            raise ValueError(
                f"prompt {i} is {len(prompt.token_ids)} tokens; max_model_len is {max_model_len}, "
                "which must leave room for at least one generated token"
            )
        parsed.append(prompt)
    return parsed


def render_chat(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]], chat_template: str | None = None,
    add_generation_prompt: bool = True,
) -> Prompt:
    """A conversation as the model's prompt, through its chat template (or ``chat_template``).

    The rendered text already holds the template's special tokens, so it is tokenized
    without adding more.
    """
    text = tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])


def params_per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: a single one is shared; a list must match the prompts."""
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling_params must be one SamplingParams or a list of {count} of them (one per prompt)")
    return params


def loras_per_prompt(lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int) -> list[LoRARequest | None]:
    """One adapter (or None) per prompt: a single one is shared; a list must match the prompts."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * count
    loras = list(lora_request)
    if len(loras) != count or not all(r is None or isinstance(r, LoRARequest) for r in loras):
        raise ValueError(f"lora_request must be one LoRARequest or a list of {count} (one per prompt, None for none)")
    return loras


def check_params_for_model(params: SamplingParams, vocab_size: int) -> None:
    """The checks a SamplingParams can only pass against a model: token ids in its vocabulary
    (a bad id would otherwise fail deep inside the sampler, in the middle of a batch)."""
    if params.logit_bias:
        bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > vocab_size:
            raise ValueError(f"{name} must be at most the vocabulary size ({vocab_size}); got {value}")


def make_request(
    request_id: str, prompt: Prompt, params: SamplingParams, eos_token_ids: frozenset[int], arrival_time: float | None,
    lora_request: LoRARequest | None = None,
) -> Request:
    """The engine-side request for a checked prompt (arriving now unless told otherwise),
    run with ``lora_request``'s adapter (lesson 14) when given."""
    return Request(
        request_id=request_id,
        prompt=prompt.text,
        prompt_token_ids=prompt.token_ids,
        params=params,
        eos_token_ids=eos_token_ids,
        arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        lora_request=lora_request,
    )
