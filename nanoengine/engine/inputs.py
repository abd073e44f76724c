"""Prompts as users give them (vLLM's forms), checked and turned into token ids before any work."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from nanoengine.lora.request import LoRARequest
from nanoengine.multimodal.inputs import MultiModalInputs, images_of, process_prompt, split_chat_images
from nanoengine.request import Request
from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class Prompt:
    """A prompt's text (None when given as ids) and its token ids; ``mm_inputs``: its images
    (lesson 16), whose tokens are already in ``token_ids``."""

    text: str | None
    token_ids: list[int]
    mm_inputs: MultiModalInputs | None = None


def _as_list(prompts: object) -> list:
    if isinstance(prompts, (str, dict, Prompt)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be a string, a dict with prompt_token_ids, or a list of those; got {type(prompts).__name__}")


def parse_prompts(
    prompts: object, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_model_len: int, need_room: bool = True,
    processor: object | None = None,
) -> list[Prompt]:
    """Tokenize and check every prompt: non-empty, ids in the vocabulary, shorter than the
    context (with ``need_room`` False, as an embedding needs no generated token: at most as long).
    A prompt with ``multi_modal_data`` goes through a multimodal model's ``processor``; a
    :class:`Prompt` (a rendered chat) is only checked."""
    parsed = []
    for i, item in enumerate(_as_list(prompts)):
        if isinstance(item, Prompt):
            prompt = item
        elif isinstance(item, dict) and "multi_modal_data" in item:
            prompt = _multimodal_prompt(i, item, processor)
        elif isinstance(item, str):
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
        if len(prompt.token_ids) > max_model_len - need_room:
            room = ", which must leave room for at least one generated token" if need_room else ""
            raise ValueError(f"prompt {i} is {len(prompt.token_ids)} tokens; max_model_len is {max_model_len}{room}")
        parsed.append(prompt)
    return parsed


def _multimodal_prompt(i: int, item: dict, processor: object | None) -> Prompt:
    if processor is None:
        raise ValueError(f"prompt {i} has multi_modal_data, but this model takes no images")
    if not isinstance(item.get("prompt"), str):
        raise ValueError(f"prompt {i}: a prompt with multi_modal_data needs its text as 'prompt'")
    try:
        ids, mm_inputs = process_prompt(processor, item["prompt"], images_of(item["multi_modal_data"]),
                                        processor.image_token_id)
    except ValueError as exc:
        raise ValueError(f"prompt {i}: {exc}") from None
    return Prompt(item["prompt"], ids, mm_inputs)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict], chat_template: str | None = None,
    add_generation_prompt: bool = True, processor: object | None = None,
) -> Prompt:
    """A conversation as the model's prompt, through its chat template (or ``chat_template``).

    The rendered text already holds the template's special tokens, so it is tokenized
    without adding more. Image parts (``image_url``, lesson 16) need a multimodal model's
    ``processor``, which expands each image's placeholder into its tokens. Every failure is
    a ValueError naming it (a template that is missing or refuses the conversation too).
    """
    messages, images = split_chat_images(conversation)
    if images and processor is None:
        raise ValueError("the conversation has images, but this model takes no images")
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja's errors, or transformers' ValueError for a missing template
        raise ValueError(f"cannot apply the chat template: {exc}") from None
    if not images:
        return Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, mm_inputs = process_prompt(processor, text, images, processor.image_token_id)
    return Prompt(text, ids, mm_inputs)


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
        mm_hashes=prompt.mm_inputs.hashes if prompt.mm_inputs is not None else (),
    )
