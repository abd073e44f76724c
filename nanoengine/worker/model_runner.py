"""Lesson 06: one engine step on the model: flatten the batch, run it, sample.

Only ``SchedulerOutput`` comes in and only ``ModelRunnerOutput`` goes out, so the same
runner can later sit in another process or on each tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses

import torch

from nanoengine.attention.metadata import AttentionMetadata, build_attention_metadata
from nanoengine.attention.registry import AttentionFn
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache
from nanoengine.request import child_params, child_request_id
from nanoengine.sampling import SamplingRow, TokenLogprobs, gather_logprobs, sample
from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput


@dataclasses.dataclass(slots=True)
class ModelRunnerOutput:
    """What a step produced, by request id.

    ``sampled_token_ids``: one token for each request whose chunk reached the end of its
    sequence (``n`` tokens for a request about to fork into ``n`` sequences);
    ``logprobs``: for requests that asked, one entry per sampled token;
    ``prompt_logprobs``: for requests that asked, the index of the first prompt token this
    step predicted and one entry per predicted prompt token (the token after each computed
    prompt position).
    """

    sampled_token_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = dataclasses.field(default_factory=dict)


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

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        if request_id not in self.request_generators:
            self.request_generators[request_id] = torch.Generator().manual_seed(seed)
        return self.request_generators[request_id]

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in plan.finished_request_ids:
            self.request_generators.pop(request_id, None)
        self.kv_cache.copy_blocks(plan.blocks_to_copy)
        if not plan.scheduled:
            return ModelRunnerOutput()
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
        output = ModelRunnerOutput()
        if sampling:
            last_rows = [metadata.query_start_loc[i + 1] - 1 for i in sampling]
            logits = self.model.compute_logits(hidden[last_rows])
            self._sample(logits, [scheduled[i] for i in sampling], output)
        # END SOLUTION
        self._prompt_logprobs(hidden, metadata, scheduled, output)
        return output

    def _sample(self, logits: torch.Tensor, chosen: list[ScheduledRequest], output: ModelRunnerOutput) -> None:
        """One token per request, or ``n`` from the same logits for a request about to fork;
        each fork child draws with its own generator, which it keeps afterwards."""
        rows, owners, row_logits = [], [], []
        for i, s in enumerate(chosen):
            if s.params.n == 1:
                sequences = [(s.request_id, s.params)]
            else:
                sequences = [(child_request_id(s.request_id, k), child_params(s.params, k)) for k in range(s.params.n)]
            for sequence_id, params in sequences:
                rows.append(
                    SamplingRow(
                        params, self._generator_for(sequence_id, params.seed), s.banned_token_ids,
                        s.prompt_token_ids, s.output_token_ids,
                    )
                )
                owners.append(s.request_id)
                row_logits.append(i)
        if len(row_logits) > len(chosen):  # some request forks: repeat its row once per child
            logits = logits[row_logits]
        result = sample(logits, rows, self.generator)
        for owner, token, logprobs in zip(owners, result.token_ids, result.logprobs):
            output.sampled_token_ids.setdefault(owner, []).append(token)
            if logprobs is not None:
                output.logprobs.setdefault(owner, []).append(logprobs)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, metadata: AttentionMetadata, scheduled: list[ScheduledRequest],
        output: ModelRunnerOutput,
    ) -> None:
        """For requests that asked: the log-probability of each next prompt token this step saw."""
        for i, s in enumerate(scheduled):
            top = s.params.prompt_logprobs
            start = s.num_computed_tokens
            end = min(start + len(s.token_ids), len(s.prompt_token_ids) - 1)
            if top is None or end <= start:
                continue
            first_row = metadata.query_start_loc[i]
            logits = self.model.compute_logits(hidden[first_row : first_row + end - start]).float()
            targets = s.prompt_token_ids[start + 1 : end + 1]
            entries = gather_logprobs(logits.log_softmax(-1), targets, [top] * len(targets))
            output.prompt_logprobs[s.request_id] = (start + 1, entries)
