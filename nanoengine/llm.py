"""``LLM``: the offline API, shaped as vLLM's so a learner's script transfers by changing the import.

Under it runs lesson 06's engine (continuous batching over a paged KV cache). Any object
with the engine interface (``add_request`` / ``step`` / ``abort_request`` /
``has_unfinished_requests``) can take its place in ``llm.llm_engine``: lessons 01–04 put
their one-request-at-a-time ``NaiveEngine`` there. The API stays.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nanoengine.config import (
    TASKS, CacheConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig,
)
from nanoengine.engine.inputs import (
    check_params_for_model, loras_per_prompt, params_per_prompt, parse_prompts, render_chat,
)
from nanoengine.engine.llm_engine import LLMEngine
from nanoengine.lora.request import LoRARequest
from nanoengine.model import load_model
from nanoengine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from nanoengine.parallel.launch import start_parallel
from nanoengine.pooling.config import PoolerConfig
from nanoengine.pooling.embedder import Embedder
from nanoengine.sampling.beam_search import (
    BeamSearchOutput, BeamSearchParams, BeamSearchSequence, best_beams, expand_beams,
)
from nanoengine.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict]


class LLM:
    """A model loaded for offline generation.

    ``model`` is None (the bundled SmolLM2-135M-Instruct), a bundled name, a Hugging Face
    directory or a ``.gguf`` file. ``dtype="auto"`` is bfloat16 where the hardware computes
    it natively, float32 elsewhere. ``fast_path`` (on by default) runs lesson 15's fast
    kernels; ``fast_path=False`` runs the reference path, which the tests compare it with.
    ``enforce_eager=True`` (as in vLLM) runs a decode step module by module instead of as
    lesson 17's one fused call; float32 greedy tokens are the same either way.
    ``batch_invariant=True`` (as in vLLM): a request's greedy tokens do not depend on the rest
    of the batch, on chunking or on prefix-cache hits (CPU, float32 or bfloat16; slower;
    no LoRA): see ``nanoengine.model.batch_invariant``.
    ``speculative_config`` (lesson 10), as vLLM spells it: ``{"method": "ngram" |
    "draft_model", "num_speculative_tokens": k, ...}`` (see :class:`SpeculativeConfig`).
    ``tensor_parallel_size`` / ``pipeline_parallel_size`` (lesson 12) spread the model over
    that many ranks (processes, started by ``distributed_executor_backend``); ``loaded.model``
    is then rank 0's share, and :meth:`shutdown` stops the other ranks.
    ``enable_lora`` (lesson 14): requests may name a PEFT LoRA adapter
    (``generate(..., lora_request=LoRARequest(name, id, path))``); up to ``max_loras``
    adapters, of rank at most ``max_lora_rank``, run in one step beside the base model.
    ``task`` (lesson 16): ``"generate"``, or ``"embed"`` for :meth:`embed` (one vector per
    text, pooled as ``pooler_config`` says, else as the model folder says); ``"auto"``
    embeds with encoder models (BERT) and generates with the rest.
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
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        device: str = "auto",
        trace: bool = False,
        fast_path: bool = True,
        enforce_eager: bool = False,
        batch_invariant: bool = False,
        speculative_config: dict | None = None,
        quantization: str | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str = "mp",
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        task: str = "auto",
        pooler_config: PoolerConfig | dict | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        self.model_config = ModelConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, device=device, fast_path=fast_path,
            enforce_eager=enforce_eager, batch_invariant=batch_invariant, quantization=quantization,
        )
        cache = CacheConfig(block_size, kv_cache_memory_bytes, gpu_memory_utilization, enable_prefix_caching)
        scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        speculative = SpeculativeConfig.from_dict(speculative_config)
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size,
                                  distributed_executor_backend=distributed_executor_backend)
        if not isinstance(enable_lora, bool):
            raise ValueError(f"enable_lora must be a bool; got {enable_lora!r}")
        lora = LoRAConfig(max_loras, max_lora_rank) if enable_lora else None
        if lora is not None and (parallel.world_size > 1 or speculative is not None):
            raise ValueError("enable_lora does not run with tensor/pipeline parallelism or speculative decoding yet")
        if lora is not None and batch_invariant:
            raise ValueError("enable_lora does not run with batch_invariant=True: an adapter's matmuls gather a "
                             "varying number of rows")
        if parallel.world_size > 1 and speculative is not None:
            raise ValueError("speculative decoding does not run with tensor or pipeline parallelism yet")
        pooler = PoolerConfig.from_value(pooler_config)
        if task == "embed" and (parallel.world_size > 1 or speculative is not None or lora is not None):
            raise ValueError("task='embed' runs on one rank, without speculative decoding or LoRA")
        self._request_ids = itertools.count()
        self.llm_engine: LLMEngine | None = None
        self.embedder: Embedder | None = None
        executor = start_parallel(self.model_config, parallel, seed) if task != "embed" else None
        self.loaded = executor.loaded if executor else load_model(self.model_config)
        is_encoder = getattr(self.loaded.model, "is_encoder", False)
        if is_encoder and task == "generate":
            raise ValueError(f"{type(self.loaded.model).__name__} is an encoder: it embeds text (task='embed'), "
                             "it does not generate")
        self.task = "embed" if task == "embed" or is_encoder else "generate"
        if self.task == "embed":
            if executor or speculative is not None or lora is not None:
                if executor:
                    executor.shutdown()
                raise ValueError("an encoder model runs on one rank, without speculative decoding or LoRA")
            self.embedder = Embedder(self.loaded, pooler, max_num_batched_tokens)
            return
        if pooler is not None:
            raise ValueError("pooler_config is for task='embed'")
        try:
            self.llm_engine = LLMEngine(self.loaded, cache, scheduler, seed=seed, trace=trace,
                                        speculative=speculative, executor=executor, lora=lora)
        except BaseException:
            if executor:
                executor.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the engine's other ranks (tensor/pipeline parallelism); a no-op on one rank."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()

    def _generation_engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise ValueError("this LLM embeds (task='embed'); it does not generate: call llm.embed(...)")
        return self.llm_engine

    def embed(self, prompts: str | dict | Sequence[str | dict], use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One vector per prompt (lesson 16), in the order of the prompts; prompts as
        :meth:`generate` takes them. Each must fit the model: ``max_model_len`` tokens, or a
        sentence-transformers model's ``max_seq_length`` (its ``max_model_len``)."""
        if self.embedder is None:
            raise ValueError("this LLM generates; build it with LLM(model, task='embed') to embed")
        parsed = parse_prompts(prompts, self.loaded.tokenizer, self.loaded.hf_config.vocab_size,
                               self.loaded.max_model_len, need_room=False)
        vectors = []
        with tqdm(total=len(parsed), desc="Embedded prompts", disable=not use_tqdm or len(parsed) < 2) as bar:
            for start in range(0, len(parsed), 64):
                chunk = parsed[start : start + 64]
                vectors += self.embedder.embed([list(p.token_ids) for p in chunk])
                bar.update(len(chunk))
        return [EmbeddingRequestOutput(str(next(self._request_ids)), list(p.token_ids), EmbeddingOutput(v.tolist()))
                for p, v in zip(parsed, vectors)]

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts.

        ``lora_request``: one adapter for every prompt, or a list with one per prompt (None
        in it: the base model), as vLLM takes it (lesson 14).
        """
        self._generation_engine()
        parsed = parse_prompts(
            prompts, self.loaded.tokenizer, self.loaded.hf_config.vocab_size, self.loaded.max_model_len,
            processor=self.loaded.processor,
        )
        params = params_per_prompt(sampling_params, len(parsed))
        for p in params:
            check_params_for_model(p, self.loaded.hf_config.vocab_size)
            if p.output_kind == RequestOutputKind.DELTA:
                raise ValueError("output_kind DELTA is for stepping an engine or streaming; LLM.generate returns "
                                 "each request whole")
        # only the finished outputs are kept, so the engine need not snapshot the others every step
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        loras = loras_per_prompt(lora_request, len(parsed))
        engine = self._generation_engine()
        for lora in loras:
            if lora is not None:
                engine.add_lora(lora)  # a bad adapter fails here, before any request is added
        request_ids = [str(next(self._request_ids)) for _ in parsed]
        for request_id, prompt, p, lora in zip(request_ids, parsed, params, loras):
            engine.add_request(request_id, prompt, p, lora_request=lora)
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(parsed), desc="Processed prompts", disable=not use_tqdm or len(parsed) < 2) as bar:
                started, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
                while len(finished) < len(request_ids):
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            prompt_tokens += len(output.prompt_token_ids)
                            output_tokens += sum(len(c.token_ids) for c in output.outputs)
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
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate a reply to one conversation or to each of a list of them.

        Each conversation is rendered with the model's chat template (or ``chat_template``);
        ``lora_request`` as in :meth:`generate`.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [render_chat(self.loaded.tokenizer, conversation, chat_template, add_generation_prompt,
                               self.loaded.processor)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter before any request needs it (False: already loaded)."""
        return self._generation_engine().add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._generation_engine().remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self._generation_engine().list_loras()

    def beam_search(
        self, prompts: str | dict | Sequence[str | dict], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """The ``beam_width`` best continuations of each prompt (lesson 09), best first.

        Each step generates one token with ``2 * beam_width`` logprobs for every live beam of
        every prompt, as one batch; the prefix cache spares recomputing the beams' shared
        blocks. A beam that reaches ``max_model_len`` stops there ("length").
        """
        tokenizer, max_len = self.loaded.tokenizer, self.loaded.max_model_len
        parsed = parse_prompts(prompts, tokenizer, self.loaded.hf_config.vocab_size, max_len)
        eos = self.loaded.eos_token_ids
        step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                                     ignore_eos=True, detokenize=False)
        live = [[BeamSearchSequence(list(p.token_ids))] for p in parsed]
        done: list[list[BeamSearchSequence]] = [[] for _ in parsed]
        for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
            for i, beams in enumerate(live):
                done[i] += [b for b in beams if len(b.tokens) >= max_len]
                live[i] = [b for b in beams if len(b.tokens) < max_len]
            flat = [beam for beams in live for beam in beams]
            if not flat:
                break
            outputs = iter(self.generate([{"prompt_token_ids": b.tokens} for b in flat], step_params, use_tqdm=False))
            for i, beams in enumerate(live):
                proposals = [next(outputs).outputs[0].logprobs[0] for _ in beams]
                live[i], finished = expand_beams(
                    beams, proposals, params.beam_width, eos, params.length_penalty, params.ignore_eos
                )
                done[i] += finished
        results = []
        for prompt, beams, finished in zip(parsed, live, done):
            best = best_beams(finished + beams, params.beam_width, eos, params.length_penalty)
            for beam in best:
                beam.finish_reason = beam.finish_reason or "length"
                generated = beam.tokens[len(prompt.token_ids) :]
                if beam.finish_reason == "stop":
                    generated = generated[:-1]
                beam.text = tokenizer.decode(generated, skip_special_tokens=True)
            results.append(BeamSearchOutput(best))
        return results

