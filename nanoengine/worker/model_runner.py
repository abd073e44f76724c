"""Lesson 06: one engine step on the model: flatten the batch, run it, sample.

Only ``SchedulerOutput`` comes in and only ``ModelRunnerOutput`` goes out, so the same
runner can later sit in another process or on each tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses

import torch

from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.attention.registry import AttentionFn
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache
from nanoengine.sampling import sample_next_tokens
from nanoengine.scheduler.output import SchedulerOutput


@dataclasses.dataclass(slots=True)
class ModelRunnerOutput:
    """The token sampled for each request whose chunk reached the end of its sequence."""

    sampled_token_ids: dict[str, int]


class ModelRunner:
    """Runs scheduled steps on one model and one paged KV cache.

    Sampling state lives here: a seeded request gets its own generator on first sight and
    keeps it across preemption, so its tokens do not depend on the rest of the batch;
    unseeded requests share the runner's generator (seeded from the engine seed).
    """

    def __init__(
        self, model: torch.nn.Module, kv_cache: PagedKVCache, attention_fn: AttentionFn, seed: int = 0
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attention_fn = attention_fn
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.generator
        if request_id not in self.request_generators:
            self.request_generators[request_id] = torch.Generator().manual_seed(seed)
        return self.request_generators[request_id]

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in plan.finished_request_ids:
            self.request_generators.pop(request_id, None)
        if not plan.scheduled:
            return ModelRunnerOutput({})
        # BEGIN SOLUTION L06.T2
        scheduled = plan.scheduled
        input_ids = [t for s in scheduled for t in s.token_ids]
        positions = [p for s in scheduled for p in range(s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids))]
        metadata = build_attention_metadata(
            [s.block_table for s in scheduled],
            [s.num_computed_tokens for s in scheduled],
            [len(s.token_ids) for s in scheduled],
            self.kv_cache.block_size,
            self.device,
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            PagedAttention(self.kv_cache, metadata, self.attention_fn),
        )
        sampling = [i for i, s in enumerate(scheduled) if s.sample]
        if not sampling:
            return ModelRunnerOutput({})
        last_rows = [metadata.query_start_loc[i + 1] - 1 for i in sampling]
        logits = self.model.compute_logits(hidden[last_rows])
        chosen = [scheduled[i] for i in sampling]
        tokens = sample_next_tokens(
            logits,
            [s.params for s in chosen],
            [self._generator_for(s.request_id, s.params.seed) for s in chosen],
            [s.banned_token_ids for s in chosen],
        )
        return ModelRunnerOutput({s.request_id: t for s, t in zip(chosen, tokens)})
        # END SOLUTION
