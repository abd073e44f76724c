"""Lesson 06: the engine: requests in, a step at a time, outputs out.

``add_request`` and ``abort_request`` may be called between any two ``step``s. A step asks
the scheduler for a plan, has the model runner execute it, then feeds each sampled token
through the request's :class:`OutputProcessor` (text, stop strings, finish reasons) and
frees finished requests' blocks at once.

Lesson 08: a request with ``n > 1`` runs its prompt once, then forks into ``n`` sequences
that share its blocks; its :class:`RequestState` gathers them into one output.

Lesson 10: with a ``SpeculativeConfig``, a decoding request may gain several tokens in one
step (its accepted guesses and the target's next token); they are processed in order, and
any after a token that ends the sequence are dropped.

Lesson 14: with a ``LoRAConfig``, a request may name a LoRA adapter (``lora_request``);
adapters are read and checked when first seen (or added with :meth:`LLMEngine.add_lora`),
and any mix of adapters and the base model runs in one step.
"""

from __future__ import annotations

import logging

from nanoengine.attention.torch_paged import PagedKVCache
from nanoengine.cache.kv_cache_manager import KVCacheManager, num_blocks_for_budget
from nanoengine.config import CacheConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig
from nanoengine.engine.inputs import Prompt, check_params_for_model, make_request
from nanoengine.engine.output_processor import RequestState
from nanoengine.lora.manager import LoRAManager
from nanoengine.multimodal.runner import ImageInputs
from nanoengine.lora.request import LoRARequest
from nanoengine.model.loader import LoadedModel
from nanoengine.outputs import RequestOutput
from nanoengine.parallel.executor import DistributedExecutor, Executor, UniprocExecutor, WorkerFailure
from nanoengine.platform import available_memory_bytes
from nanoengine.request import RequestStatus
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.spec_decode.factory import build_proposer, load_draft
from nanoengine.spec_decode.stats import SpecDecodeStats
from nanoengine.trace import Trace
from nanoengine.worker.model_runner import decode_buckets, local_kv_shape, runner_for

logger = logging.getLogger("nanoengine")

# On a CPU, the KV cache takes this share of the RAM available at start-up by default.
CPU_KV_SHARE = 0.25


def kv_cache_budget(cache: CacheConfig, loaded: LoadedModel, bytes_per_token: int, max_num_seqs: int) -> int:
    """Bytes for the KV cache: the explicit budget, else a share of what the device has free,
    but never more than ``max_num_seqs`` sequences of ``max_model_len`` tokens could use."""
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    free = available_memory_bytes(loaded.device)
    share = cache.gpu_memory_utilization if loaded.device.type == "cuda" else CPU_KV_SHARE
    if loaded.device.type == "cpu":  # the ranks of a parallel world share this machine's RAM
        share /= loaded.layout.world_size
    useful = max_num_seqs * loaded.max_model_len * bytes_per_token
    return min(int(free * share), useful)


def kv_bytes_per_slot(loaded: LoadedModel, num_layers: int | None = None) -> int:
    """Bytes one token slot of the paged KV pool takes, measured on a one-slot pool built on
    PyTorch's ``meta`` device (shapes and dtypes, no memory): the engine sizes its pool by
    what the worker's tensors really take, which lesson 02's formula predicts.
    ``num_layers``: for a pool of only the first layers (an early-exit draft, lesson 10).
    In a parallel world it is rank 0's slot: its share of the KV heads and its stage's
    layers (the first stage has the most), so every rank's pool fits in the same budget."""
    layers, kv_heads, head_dim = local_kv_shape(loaded)
    probe = PagedKVCache(num_layers or layers, 1, 1, kv_heads, head_dim, loaded.dtype, "meta")
    return probe.nbytes


class LLMEngine:
    """Continuous batching over a paged KV cache.

    Invariant: every request added and not yet finished or aborted has a
    :class:`RequestState`, and each of its live sequences is known to the scheduler and
    mapped back to it in ``owner``; a finished sequence owns no KV blocks.

    ``executor`` (lesson 12): a :class:`DistributedExecutor` whose rank 0 loaded ``loaded``;
    each step then runs on every rank of its world. Once a rank fails, every request in
    flight fails with its message, and so does every later call (``dead``).

    ``lora`` (lesson 14): adapter slots; the runner's :class:`LoRAManager` holds the adapters.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        seed: int = 0,
        trace: bool = False,
        speculative: SpeculativeConfig | None = None,
        executor: DistributedExecutor | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        if lora is not None and (executor is not None or speculative is not None):
            raise ValueError("enable_lora does not run with tensor/pipeline parallelism or speculative decoding yet")
        self.loaded = loaded
        self.dead: str | None = None
        draft = load_draft(speculative, loaded) if speculative else None
        per_token = kv_bytes_per_slot(loaded)
        if draft is not None:  # the draft's own cache has a slot for every slot of the target's
            per_token += kv_bytes_per_slot(draft.loaded, draft.num_layers)
        budget = kv_cache_budget(cache, loaded, per_token, scheduler.max_num_seqs)
        num_blocks = num_blocks_for_budget(budget, per_token, cache.block_size)
        capacity = num_blocks * cache.block_size
        if capacity < loaded.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, less than max_model_len={loaded.max_model_len}; "
                "give it more memory (kv_cache_memory_bytes) or lower max_model_len"
            )
        self.trace = Trace(num_blocks, cache.block_size) if trace else None
        self.kv_cache_manager = KVCacheManager(num_blocks, cache.block_size, self.trace, cache.enable_prefix_caching,
                                               getattr(loaded.model, "kv_sliding_window", None))
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            scheduler.token_budget(loaded.max_model_len),
            scheduler.max_num_seqs,
            scheduler.enable_chunked_prefill,
            self.trace,
            speculative.num_speculative_tokens if speculative else 0,
            loaded.max_model_len,
            speculative.disable_by_batch_size if speculative else None,
            lora.max_loras if lora else None,
        )
        self.runner = runner_for(loaded, num_blocks, cache.block_size, seed)
        if lora is not None:
            self.runner.lora = LoRAManager(loaded.model, loaded.hf_config, lora, loaded.dtype, loaded.device)
        if loaded.processor is not None:
            self.runner.images = ImageInputs(loaded.model)
        self.executor: Executor = UniprocExecutor(self.runner)
        if executor is not None:
            executor.start(self.runner, num_blocks, cache.block_size)
            self.executor = executor
        self.speculative = speculative
        self.spec_stats = SpecDecodeStats()
        if speculative is not None:
            self.runner.proposer = build_proposer(
                speculative, draft, num_blocks, cache.block_size, self.runner.attention_fn, self.runner.generator
            )
        self.max_num_seqs = scheduler.max_num_seqs
        self.warmup_seconds = self._warm_up()
        self.states: dict[str, RequestState] = {}
        self.owner: dict[str, str] = {}
        self._unloading: set[int] = set()  # adapters removed while requests still use them (lesson 14)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token); step budget %d tokens, "
            "max_num_seqs %d, prefix caching %s", num_blocks, cache.block_size, capacity, num_blocks * cache.block_size * per_token / 2**20,
            per_token, self.scheduler.token_budget, scheduler.max_num_seqs,
            "on" if cache.enable_prefix_caching else "off",
        )

    def _warm_up(self) -> float | None:
        """Lesson 17: a model with a fused decode step runs it once per batch-size bucket (1, 2,
        4, ... up to the rows it takes and ``max_num_seqs``) before serving, and logs the time:
        on a CPU numba compiles the step once for every size (it specializes on types, not
        shapes); a GPU backend would capture one graph per bucket here (N18). None: no warm-up."""
        fused = getattr(getattr(self.loaded.model, "model", None), "fused_decode", None)
        if fused is None or self.runner.lora is not None:  # LoRA: the fused step stands aside
            return None
        sizes = decode_buckets(min(fused.max_rows, self.max_num_seqs))
        seconds = self.runner.warm_up_decode(sizes)
        logger.info("warm-up: decode step at batch sizes %s in %.1f s", ", ".join(map(str, sizes)), seconds)
        return seconds

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        if self.dead:
            raise RuntimeError(self.dead)
        check_params_for_model(params, self.loaded.hf_config.vocab_size)
        if lora_request is not None:
            self.add_lora(lora_request)
        if params.n > self.max_num_seqs:
            raise ValueError(f"n ({params.n}) must be at most max_num_seqs ({self.max_num_seqs})")
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        images = prompt.mm_inputs is not None and bool(prompt.mm_inputs.placeholders)
        if images and self.runner.images is None:
            raise ValueError("the prompt has images, but this model takes no images")
        if images and self.speculative is not None:
            raise ValueError("prompts with images do not run with speculative decoding yet")
        request = make_request(request_id, prompt, params, self.loaded.eos_token_ids, arrival_time, lora_request)
        self.scheduler.add_request(request)
        if images:
            self.runner.images.add(request_id, prompt.mm_inputs)
        self.states[request_id] = RequestState(request, self.loaded.tokenizer, self.loaded.max_model_len)
        self.owner[request_id] = request_id

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter now, so requests can use it (False: it was added before).
        A bad adapter raises ValueError naming the problem; requests in flight are untouched."""
        if self.runner.lora is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest; got {type(lora_request).__name__}")
        added = self.runner.lora.add(lora_request)
        revived = lora_request.lora_int_id in self._unloading
        self._unloading.discard(lora_request.lora_int_id)
        return added or revived

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter (False: unknown). Requests still running with it finish with it:
        its weights go once the last of them is gone."""
        if lora_id not in self.list_loras():
            return False
        self._unloading.add(lora_id)
        self._drop_unloaded_loras()
        return True

    def list_loras(self) -> set[int]:
        """The ids of the adapters added and not removed."""
        return set(self.runner.lora.adapters) - self._unloading if self.runner.lora is not None else set()

    def _drop_unloaded_loras(self) -> None:
        """Free the removed adapters that no live request uses any more."""
        if not self._unloading:
            return
        in_use = {state.request.lora_request.lora_int_id for state in self.states.values()
                  if state.request.lora_request is not None}
        for lora_id in self._unloading - in_use:
            self.runner.lora.remove(lora_id)
        self._unloading &= in_use

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all its sequences) now; its blocks are freed before the next step."""
        state = self.states.pop(request_id, None)
        if state is None:
            return
        for sequence_id in state.live_sequence_ids():
            self.scheduler.finish_request(sequence_id, RequestStatus.FINISHED_ABORTED)
            del self.owner[sequence_id]
        self._drop_unloaded_loras()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that gained a token."""
        if self.dead:
            raise RuntimeError(self.dead)
        plan = self.scheduler.schedule()
        try:
            result = self.executor.execute(plan)
        except WorkerFailure as failure:
            raise self._fail_all(str(failure)) from None
        self.scheduler.update_after_step(plan, result.sampled_token_ids)
        for sequence_id, (first, entries) in result.prompt_logprobs.items():
            self.states[self.owner[sequence_id]].add_prompt_logprobs(first, entries)
        touched: dict[str, RequestState] = {}
        for sequence_id, tokens in result.sampled_token_ids.items():
            request_id = self.owner[sequence_id]
            state = touched[request_id] = self.states[request_id]
            num_guesses = result.num_draft_tokens.get(sequence_id)
            if num_guesses is not None:  # lesson 10: accepted guesses, then the target's token
                sequence_ids = [sequence_id] * len(tokens)
                if num_guesses:
                    self.spec_stats.observe(plan.step, num_guesses, len(tokens) - 1)
            elif len(tokens) > 1:
                sequence_ids = self._fork(state, sequence_id, len(tokens))
            else:
                sequence_ids = [sequence_id]
            logprobs = result.logprobs.get(sequence_id, [None] * len(tokens))
            for child_id, token, entry in zip(sequence_ids, tokens, logprobs):
                processor = state.sequences[child_id]
                if processor.request.status.finished:
                    continue  # it stopped on an earlier token of the same step (a guess past a stop)
                ended = self.scheduler.append_token(child_id, token)
                stop = processor.observe(token, entry, ended)
                if stop is not None:
                    self.scheduler.stop_on_string(child_id, stop)
                if ended or stop is not None:
                    self.scheduler.finish_request(child_id)
                    del self.owner[child_id]
        outputs = []
        for request_id, state in touched.items():
            if state.finished:
                del self.states[request_id]
            output = state.output()
            if output is not None:
                outputs.append(output)
        self._drop_unloaded_loras()
        return outputs

    def _fail_all(self, reason: str) -> WorkerFailure:
        """A rank failed: abort every request in flight (the error to raise names them); every
        later call raises too."""
        in_flight = list(self.states)
        for request_id in in_flight:
            self.abort_request(request_id)
        self.dead = reason
        return WorkerFailure(f"{reason}; the {len(in_flight)} request(s) in flight failed: {', '.join(in_flight)}")

    def shutdown(self) -> None:
        """Stop the executor's workers (a parallel world's ranks); nothing to do on one rank."""
        self.executor.shutdown()

    def _fork(self, state: RequestState, parent_id: str, n: int) -> list[str]:
        """The prompt is done: the request becomes ``n`` sequences sharing its blocks."""
        children = self.scheduler.fork(parent_id, n)
        state.fork(children)
        del self.owner[parent_id]
        for child in children:
            self.owner[child.request_id] = state.request.request_id
        return [child.request_id for child in children]
