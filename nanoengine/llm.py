"""``LLM``: the offline API, shaped as vLLM's so a learner's script transfers by changing the import.

Under it runs lesson 06's engine (continuous batching over a paged KV cache). Any object
with the engine interface (``add_request`` / ``step`` / ``abort_request`` /
``has_unfinished_requests``) can take its place in ``llm.llm_engine``: lessons 01–04 put
their one-request-at-a-time ``NaiveEngine`` there. The API stays.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nanoengine.config import CacheConfig, ModelConfig, SchedulerConfig
from nanoengine.engine.inputs import params_per_prompt, parse_prompts
from nanoengine.engine.llm_engine import LLMEngine
from nanoengine.model import load_model
from nanoengine.outputs import RequestOutput
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
        block_size: int = 16,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool = True,
        device: str = "auto",
        trace: bool = False,
    ) -> None:
        self.model_config = ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, device=device)
        cache = CacheConfig(block_size, kv_cache_memory_bytes, gpu_memory_utilization)
        scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.loaded = load_model(self.model_config)
        self.llm_engine = LLMEngine(self.loaded, cache, scheduler, seed=seed, trace=trace)
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
        engine = self.llm_engine
        request_ids = [str(next(self._request_ids)) for _ in parsed]
        for request_id, prompt, p in zip(request_ids, parsed, params):
            engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(parsed), desc="Processed prompts", disable=not use_tqdm or len(parsed) < 2) as bar:
                started, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
                while len(finished) < len(request_ids):
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            prompt_tokens += len(output.prompt_token_ids)
                            output_tokens += len(output.outputs[0].token_ids)
                            elapsed = time.perf_counter() - started
                            bar.set_postfix_str(
                                f"est. speed input: {prompt_tokens / elapsed:.1f} toks/s, "
                                f"output: {output_tokens / elapsed:.1f} toks/s", refresh=False,
                            )
                            bar.update(1)
        except BaseException:  # interrupted: leave the engine with none of these requests
            for request_id in request_ids:
                if request_id not in finished:
                    engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in request_ids]

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
