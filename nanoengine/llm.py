"""``LLM``: the offline API, shaped as vLLM's so a learner's script transfers by changing the import.

Lessons 01–02 put the naive engine under it (one request at a time, contiguous KV cache);
later lessons swap the engine for the paged, continuously batched one. The API stays.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nanoengine.config import ModelConfig
from nanoengine.engine.inputs import params_per_prompt, parse_prompts
from nanoengine.engine.naive import NaiveEngine
from nanoengine.model import load_model
from nanoengine.outputs import RequestOutput
from nanoengine.request import Request
from nanoengine.sampling_params import SamplingParams

# What lesson 09 (issue N4) adds to the sampler; refused clearly until then.
_NOT_YET = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": None,
    "logprobs": None,
    "prompt_logprobs": None,
}

Conversation = list[dict[str, str]]


class LLM:
    """A model loaded for offline generation.

    ``model`` is None (the bundled SmolLM2-135M-Instruct), a bundled name, a Hugging Face
    directory or a ``.gguf`` file. ``dtype="auto"`` is bfloat16 where the hardware computes
    it natively, float32 elsewhere.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.model_config = ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, device=device)
        self.loaded = load_model(self.model_config)
        self.engine = NaiveEngine(self.loaded, kv_cache="contiguous", seed=seed)
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts."""
        parsed = parse_prompts(
            prompts, self.loaded.tokenizer, self.loaded.hf_config.vocab_size, self.loaded.max_model_len
        )
        params = params_per_prompt(sampling_params, len(parsed))
        for p in params:
            _check_supported(p)
        requests = [
            Request(
                request_id=str(next(self._request_ids)),
                prompt=prompt.text,
                prompt_token_ids=prompt.token_ids,
                params=p,
                eos_token_ids=self.loaded.eos_token_ids,
                arrival_time=time.monotonic(),
            )
            for prompt, p in zip(parsed, params)
        ]
        outputs = []
        for request in tqdm(requests, desc="Processed prompts", disable=not use_tqdm or len(requests) < 2):
            *_, final = self.engine.run(request)
            outputs.append(final)
        return outputs

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate a reply to one conversation or to each of a list of them.

        Each conversation is rendered with the model's chat template (or ``chat_template``);
        the rendered text already holds any special tokens, so it is tokenized without adding more.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.loaded.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _check_supported(params: SamplingParams) -> None:
    for name, default in _NOT_YET.items():
        if getattr(params, name) != default:
            raise ValueError(
                f"SamplingParams.{name}={getattr(params, name)!r} is not supported by this engine yet "
                "(it arrives with lesson 09); leave it at its default"
            )
