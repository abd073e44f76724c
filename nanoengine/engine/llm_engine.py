"""Lesson 06: the engine: requests in, a step at a time, outputs out.

``add_request`` and ``abort_request`` may be called between any two ``step``s. A step asks
the scheduler for a plan, has the model runner execute it, then feeds each sampled token
through the request's :class:`OutputProcessor` (text, stop strings, finish reasons) and
frees finished requests' blocks at once.
"""

from __future__ import annotations

import logging

from nanoengine.attention.registry import default_backend, get_attention_backend
from nanoengine.attention.torch_paged import PagedKVCache
from nanoengine.cache.contiguous import kv_bytes_per_token
from nanoengine.cache.kv_cache_manager import KVCacheManager, num_blocks_for_budget
from nanoengine.config import CacheConfig, SchedulerConfig
from nanoengine.engine.inputs import Prompt, make_request
from nanoengine.engine.output_processor import OutputProcessor
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import LoadedModel
from nanoengine.outputs import RequestOutput
from nanoengine.platform import available_memory_bytes
from nanoengine.request import RequestStatus
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler import Scheduler
from nanoengine.trace import Trace
from nanoengine.worker.model_runner import ModelRunner

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
    useful = max_num_seqs * loaded.max_model_len * bytes_per_token
    return min(int(free * share), useful)


class LLMEngine:
    """Continuous batching over a paged KV cache.

    Invariant: every request added and not yet finished or aborted is known to the
    scheduler and has an output processor; a finished request owns no KV blocks.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        seed: int = 0,
        trace: bool = False,
    ) -> None:
        self.loaded = loaded
        config = loaded.hf_config
        dtype_bytes = loaded.dtype.itemsize
        per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config), dtype_bytes)
        budget = kv_cache_budget(cache, loaded, per_token, scheduler.max_num_seqs)
        num_blocks = num_blocks_for_budget(budget, per_token, cache.block_size)
        capacity = num_blocks * cache.block_size
        if capacity < loaded.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, less than max_model_len={loaded.max_model_len}; "
                "give it more memory (kv_cache_memory_bytes) or lower max_model_len"
            )
        self.trace = Trace(num_blocks, cache.block_size) if trace else None
        self.kv_cache_manager = KVCacheManager(num_blocks, cache.block_size, self.trace)
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            scheduler.token_budget(loaded.max_model_len),
            scheduler.max_num_seqs,
            scheduler.enable_chunked_prefill,
            self.trace,
        )
        kv_tensors = PagedKVCache(
            config.num_hidden_layers, num_blocks, cache.block_size, config.num_key_value_heads,
            head_dim_of(config), loaded.dtype, loaded.device,
        )
        self.runner = ModelRunner(loaded.model, kv_tensors, get_attention_backend(default_backend(loaded.device)), seed)
        self.processors: dict[str, OutputProcessor] = {}
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token); step budget %d tokens, "
            "max_num_seqs %d", num_blocks, cache.block_size, capacity, num_blocks * cache.block_size * per_token / 2**20,
            per_token, self.scheduler.token_budget, scheduler.max_num_seqs,
        )

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None) -> None:
        request = make_request(request_id, prompt, params, self.loaded.eos_token_ids, arrival_time)
        self.scheduler.add_request(request)
        self.processors[request_id] = OutputProcessor(request, self.loaded.tokenizer, self.loaded.max_model_len)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed before the next step."""
        if self.processors.pop(request_id, None) is not None:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that gained a token."""
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        self.scheduler.update_after_step(plan)
        outputs = []
        for request_id, token in result.sampled_token_ids.items():
            output = self.processors[request_id].process_token(token)
            outputs.append(output)
            if output.finished:
                del self.processors[request_id]
                self.scheduler.finish_request(request_id)
        return outputs
