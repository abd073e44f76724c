"""Lessons 01–04: the decode loop, recomputing everything, then over a contiguous KV cache,
then over a paged one.

The loops are generators of token ids: they run the model only when the caller asks for
the next token, so the caller alone decides when a sequence stops. They stay in the package
as oracles: every faster engine must produce the same tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence

import torch

from nanoengine.attention import ContiguousKVCache, NoCache
from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.attention.registry import AttentionFn, default_backend, get_attention_backend
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache
from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.engine.inputs import Prompt, check_params_for_model, make_request
from nanoengine.engine.output_processor import RequestState
from nanoengine.lora.request import LoRARequest
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import LoadedModel
from nanoengine.outputs import RequestOutput
from nanoengine.request import Request, RequestStatus, append_token, stop_on_string
from nanoengine.sampling import SamplingRow, sample
from nanoengine.sampling_params import SamplingParams

# Maps the last position's logits ([vocab], float32) to the next token id.
NextToken = Callable[[torch.Tensor], int]


@torch.inference_mode()
def recompute_decode(model: torch.nn.Module, prompt_token_ids: Sequence[int], next_token: NextToken) -> Iterator[int]:
    """Yield tokens forever, running the model over the *whole* sequence at every step.

    Step ``n`` costs a forward over ``prompt + n`` tokens, so generating N tokens costs
    O(N²) token-forwards: the waste lesson 02 removes.
    """
    # BEGIN SOLUTION L01.T1
    device = next(model.parameters()).device
    token_ids = list(prompt_token_ids)
    no_cache = NoCache()
    while True:
        hidden = model(
            torch.tensor(token_ids, device=device), torch.arange(len(token_ids), device=device), no_cache
        )
        token = next_token(model.compute_logits(hidden[-1:])[0])
        token_ids.append(token)
        yield token
    # END SOLUTION


@torch.inference_mode()
def kv_cache_decode(
    model: torch.nn.Module, prompt_token_ids: Sequence[int], next_token: NextToken, cache: ContiguousKVCache
) -> Iterator[int]:
    """Yield tokens forever; the prompt is computed once (prefill), then one token per step.

    Prefill writes K/V of every prompt token into ``cache``; each decode step feeds only the
    newest token at its position and reads the rest from the cache.
    """
    # BEGIN SOLUTION L02.T3
    device = next(model.parameters()).device
    prompt = torch.tensor(list(prompt_token_ids), device=device)
    hidden = model(prompt, torch.arange(len(prompt), device=device), cache)
    cache.commit(len(prompt))
    while True:
        token = next_token(model.compute_logits(hidden[-1:])[0])
        yield token
        position = torch.tensor([cache.num_tokens], device=device)
        hidden = model(torch.tensor([token], device=device), position, cache)
        cache.commit(1)
    # END SOLUTION


@torch.inference_mode()
def paged_decode(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[int],
    next_token: NextToken,
    manager: KVCacheManager,
    kv_cache: PagedKVCache,
    request_id: str = "0",
    attention_fn: AttentionFn | None = None,
) -> Iterator[int]:
    """Like :func:`kv_cache_decode`, over a paged cache: before each forward the manager
    grows the sequence's block table to cover its tokens, and attention finds K/V through it.

    The blocks return to the pool when the caller stops iterating (the generator closes).
    ``attention_fn`` picks the backend that reads the cache (default: the PyTorch reference).
    """
    device = next(model.parameters()).device
    token_ids = list(prompt_token_ids)
    num_computed = 0
    try:
        while True:
            if not manager.allocate_slots(request_id, token_ids):
                raise RuntimeError(f"the KV cache has no free block for request {request_id!r}")
            metadata = build_attention_metadata(
                [manager.block_table(request_id)], [num_computed], [len(token_ids) - num_computed],
                manager.block_size, device,
            )
            hidden = model(
                torch.tensor(token_ids[num_computed:], device=device),
                torch.arange(num_computed, len(token_ids), device=device),
                PagedAttention(kv_cache, metadata, attention_fn),
            )
            num_computed = len(token_ids)
            token = next_token(model.compute_logits(hidden[-1:])[0])
            token_ids.append(token)
            yield token
    finally:
        if request_id in manager.tables:
            manager.free(request_id)


KV_CACHES = ("none", "contiguous", "paged")


class NaiveEngine:
    """Runs requests one at a time, start to finish: lessons 01–04's engine.

    It has the engine interface ``LLM`` drives (``add_request`` / ``step`` /
    ``abort_request`` / ``has_unfinished_requests``), each step producing one token of the
    request at the head of the queue, so a lesson can put it under ``LLM`` in place of
    lesson 06's batching engine. ``kv_cache`` picks the loop: ``"none"`` recomputes
    everything (lesson 01), ``"contiguous"`` reserves a cache per request (lesson 02),
    ``"paged"`` takes blocks of ``block_size`` tokens from a pool sized for one
    ``max_model_len`` sequence (lessons 03–04). Unseeded requests draw from one engine
    generator seeded at start, so a script's outputs are reproducible run to run.
    """

    def __init__(self, loaded: LoadedModel, kv_cache: str = "contiguous", block_size: int = 16, seed: int = 0) -> None:
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}; got {kv_cache!r}")
        if kv_cache == "contiguous" and getattr(loaded.model, "sliding_window_attention", False):
            raise ValueError("lesson 02's contiguous KV cache has no sliding window, which this model's layers need; "
                             "use kv_cache='paged' or 'none', or LLM's engine")
        self.loaded = loaded
        self.kv_cache = kv_cache
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: collections.deque[Request] = collections.deque()
        self.current: tuple[Request, RequestState, Iterator[int]] | None = None
        if kv_cache == "paged":
            config = loaded.hf_config
            num_blocks = -(-loaded.max_model_len // block_size)
            self.manager = KVCacheManager(num_blocks, block_size)
            self.attention_fn = get_attention_backend(default_backend(loaded.device))
            self.paged_cache = PagedKVCache(
                config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                head_dim_of(config), loaded.dtype, loaded.device,
            )

    def _token_stream(self, request: Request, next_token: NextToken) -> Iterator[int]:
        model = self.loaded.model
        if self.kv_cache == "none":
            return recompute_decode(model, request.prompt_token_ids, next_token)
        if self.kv_cache == "paged":
            return paged_decode(model, request.prompt_token_ids, next_token, self.manager, self.paged_cache,
                                request.request_id, self.attention_fn)
        config = self.loaded.hf_config
        cache = ContiguousKVCache(
            config.num_hidden_layers,
            request.max_total_tokens(self.loaded.max_model_len),
            config.num_key_value_heads,
            head_dim_of(config),
            self.loaded.dtype,
            self.loaded.device,
        )
        return kv_cache_decode(model, request.prompt_token_ids, next_token, cache)

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        if lora_request is not None:
            self.add_lora(lora_request)
        check_params_for_model(params, self.loaded.hf_config.vocab_size)
        for name, default in (("n", 1), ("logprobs", None), ("prompt_logprobs", None)):
            if getattr(params, name) != default:
                raise ValueError(
                    f"SamplingParams.{name}={getattr(params, name)!r}: the one-at-a-time NaiveEngine of lessons "
                    "01-04 runs one sequence without logprobs; LLMEngine (lesson 06 on) has it"
                )
        self.queue.append(make_request(request_id, prompt, params, self.loaded.eos_token_ids, arrival_time))

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """LoRA adapters are lesson 14's, on ``LLMEngine``: refused here, by name."""
        raise ValueError("the one-at-a-time NaiveEngine of lessons 01-04 runs no LoRA adapters; "
                         "LLMEngine with enable_lora=True (lesson 14) does")

    def has_unfinished_requests(self) -> bool:
        return self.current is not None or bool(self.queue)

    def abort_request(self, request_id: str) -> None:
        if self.current is not None and self.current[0].request_id == request_id:
            self.current[0].status = RequestStatus.FINISHED_ABORTED
            self.current[2].close()
            self.current = None
        else:
            self.queue = collections.deque(r for r in self.queue if r.request_id != request_id)

    def _start(self, request: Request) -> tuple[Request, RequestState, Iterator[int]]:
        params = request.params
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)

        def next_token(logits: torch.Tensor) -> int:
            row = SamplingRow(params, generator, request.banned_token_ids(), request.prompt_token_ids,
                              request.output_token_ids)
            return sample(logits[None], [row], self.generator).token_ids[0]

        request.status = RequestStatus.RUNNING
        state = RequestState(request, self.loaded.tokenizer, self.loaded.max_model_len)
        return request, state, self._token_stream(request, next_token)

    def step(self) -> list[RequestOutput]:
        """One more token of the request at the head of the queue."""
        if self.current is None:
            if not self.queue:
                return []
            self.current = self._start(self.queue.popleft())
        request, state, stream = self.current
        token = next(stream)  # this loop owns its request: it appends the token, and ends it
        ended = append_token(request, token, self.loaded.max_model_len)
        stop = state.sequences[request.request_id].observe(token, None, ended)
        if stop is not None:
            stop_on_string(request, stop)
        if state.finished:
            stream.close()  # frees a paged request's blocks now, not when garbage-collected
            self.current = None
        output = state.output()
        return [] if output is None else [output]
