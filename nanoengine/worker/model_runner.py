"""Lesson 06: one engine step on the model: flatten the batch, run it, sample.

Only ``SchedulerOutput`` comes in and only ``ModelRunnerOutput`` goes out, so the same
runner can later sit in another process or on each tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from nanoengine.attention.metadata import AttentionMetadata, build_attention_metadata
from nanoengine.attention.registry import AttentionFn, default_backend, load_backend
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache
from nanoengine.lora.manager import LoRAManager
from nanoengine.multimodal.runner import ImageInputs
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import LoadedModel
from nanoengine.parallel.state import split_evenly
from nanoengine.request import child_params, child_request_id
from nanoengine.sampling import SamplingRow, TokenLogprobs, gather_logprobs, sample
from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput
from nanoengine.spec_decode.proposer import Proposal, ProposalRequest, Proposer
from nanoengine.spec_decode.verifier import verify
from nanoengine.worker.input_batch import InputBatch


@dataclasses.dataclass(slots=True)
class ModelRunnerOutput:
    """What a step produced, by request id.

    ``sampled_token_ids``: one token for each request whose chunk reached the end of its
    sequence (``n`` tokens for a request about to fork into ``n`` sequences);
    ``logprobs``: for requests that asked, one entry per sampled token;
    ``prompt_logprobs``: for requests that asked, the index of the first prompt token this
    step predicted and one entry per predicted prompt token (the token after each computed
    prompt position); ``num_draft_tokens``: for each request whose guesses were checked
    (lesson 10), how many there were; its ``sampled_token_ids`` are then its accepted
    guesses and one token of the target's, in order.
    """

    sampled_token_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = dataclasses.field(default_factory=dict)
    num_draft_tokens: dict[str, int] = dataclasses.field(default_factory=dict)


def local_kv_shape(loaded: LoadedModel) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of this rank's KV cache: its pipeline stage's layers
    and its tensor-parallel share of the KV heads (lesson 12; the whole model on one rank)."""
    config, layout = loaded.hf_config, loaded.layout
    layers = len(split_evenly(config.num_hidden_layers, layout.pp.size, layout.pp.rank))
    return layers, config.num_key_value_heads // layout.tp.size, head_dim_of(config)


def decode_buckets(max_size: int) -> list[int]:
    """The batch sizes a step is prepared for ahead of time, vLLM's capture sizes: 1, 2, 4, then
    multiples of 8, up to ``max_size`` (and ``max_size`` itself)."""
    sizes = [size for size in (1, 2, 4, *range(8, max_size + 1, 8)) if size <= max_size]
    return sizes if sizes[-1] == max_size else [*sizes, max_size]


def runner_for(loaded: LoadedModel, num_blocks: int, block_size: int, seed: int) -> ModelRunner:
    """A runner over ``loaded`` with a paged KV cache of ``num_blocks`` blocks on its device,
    attending with the backend its device (and fast path, or batch-invariant mode) calls for;
    batch-invariant mode takes no substitute for its kernel. The fast path keeps its inputs in
    a persistent batch (lesson 17) unless ``enforce_eager`` asks for lesson 06's step."""
    layers, kv_heads, head_dim = local_kv_shape(loaded)
    kv_cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, loaded.dtype, loaded.device)
    backend = load_backend(default_backend(loaded.device, loaded.fast_path, loaded.batch_invariant), loaded.dtype,
                           fallback=None if loaded.batch_invariant else "torch_batched")
    runner = ModelRunner(loaded.model, kv_cache, backend, seed, samples=loaded.layout.pp.is_first)
    if loaded.fast_path and not loaded.enforce_eager:
        runner.input_batch = InputBatch(block_size, loaded.device)
    return runner


class ModelRunner:
    """Runs scheduled steps on one model and one paged KV cache.

    Sampling state lives here: a seeded request gets its own generator on first sight and
    keeps it across preemption, so its tokens do not depend on the rest of the batch;
    unseeded requests share the runner's generator (seeded from the engine seed).

    Under tensor parallelism every rank runs the same steps on its share of the model (and
    samples the same tokens, from the same gathered logits); ``samples=False``: a later
    pipeline stage, which only runs its layers (lesson 12). ``lora``: the adapters it applies
    (lesson 14), set up by an engine with LoRA enabled. ``input_batch``: where the fast path
    keeps its step inputs between steps (lesson 17; None: each step is built afresh).
    """

    def __init__(
        self, model: torch.nn.Module, kv_cache: PagedKVCache, attention_fn: AttentionFn, seed: int = 0,
        samples: bool = True,
    ) -> None:
        self.model = model
        self.samples = samples
        self.kv_cache = kv_cache
        self.attention_fn = attention_fn
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}
        self.proposer: Proposer | None = None  # lesson 10: set by an engine that speculates
        self.lora: LoRAManager | None = None  # lesson 14: set by an engine with LoRA enabled
        self.images: ImageInputs | None = None  # lesson 16: set by an engine over a multimodal model
        self.input_batch: InputBatch | None = None  # lesson 17: set by runner_for on the fast path

    @torch.inference_mode()
    def warm_up_decode(self, batch_sizes: list[int]) -> float:
        """Lesson 17: run a decode step (and its logits) at each batch size, before any request,
        so that what compiles or loads on first use does it now, not inside a user's first
        token: the fused decode step (compiled, or loaded from numba's disk cache, at its first
        call in each process) and the kernels it calls. Every dummy sequence writes its one
        token to slot 0, which no request owns yet. Returns the seconds it took."""
        start = time.perf_counter()
        for size in batch_sizes:
            metadata = build_attention_metadata([[0]] * size, [0] * size, [1] * size, self.kv_cache.block_size,
                                                self.device)
            zeros = torch.zeros(size, dtype=torch.int64, device=self.device)
            hidden = self.model(zeros, zeros, PagedAttention(self.kv_cache, metadata, self.attention_fn))
            if self.samples:
                self.model.compute_logits(hidden)
        return time.perf_counter() - start

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
        if self.images is not None:
            self.images.forget(plan.finished_request_ids)
        if self.proposer is not None:
            self.proposer.forget(plan.finished_request_ids + plan.preempted_request_ids)
        if self.input_batch is not None:
            self.input_batch.forget(plan.finished_request_ids + plan.preempted_request_ids)
        self.kv_cache.copy_blocks(plan.blocks_to_copy)
        if not plan.scheduled:
            return ModelRunnerOutput()
        plan, proposals = self._with_proposals(plan)
        scheduled = plan.scheduled
        if self.lora is not None:
            self.lora.prepare(scheduled)
        if self.images is not None:
            self.images.prepare(scheduled)
        hidden, metadata = self._run_model(scheduled)
        output = ModelRunnerOutput()
        if not self.samples:  # a later pipeline stage: the first stage samples (lesson 12)
            return output
        # BEGIN SOLUTION L06.T2
        sampling = [i for i, s in enumerate(scheduled) if s.sample]
        if sampling:
            last_rows = [metadata.query_start_loc[i + 1] - 1 for i in sampling]
            logits = self.model.compute_logits(hidden[last_rows])
            self._sample(logits, [scheduled[i] for i in sampling], output)
        # END SOLUTION
        if proposals:
            self._verify(hidden, metadata, scheduled, proposals, output)
        self._prompt_logprobs(hidden, metadata, scheduled, output)
        return output

    def _run_model(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Flatten the scheduled chunks into one batch of tokens and run the model over it:
        the hidden state of every token, and the metadata that says whose rows are whose."""
        if self.input_batch is not None:  # lesson 17: the same inputs, written in place
            input_ids, positions, metadata = self.input_batch.prepare(scheduled)
            attn = PagedAttention(self.kv_cache, metadata, self.attention_fn)
            return self.model(input_ids, positions, attn), metadata
        # BEGIN SOLUTION L06.T2
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
        return hidden, metadata
        # END SOLUTION

    def _with_proposals(self, plan: SchedulerOutput) -> tuple[SchedulerOutput, dict[str, Proposal]]:
        """Lesson 10: the proposer's guesses for every request given lookahead slots, and the
        plan that computes them after each such request's last token. In that plan those
        requests sample nothing: :meth:`_verify` decides their tokens."""
        asking = [s for s in plan.scheduled if s.num_lookahead_tokens]
        if self.proposer is None or not asking:
            return plan, {}
        requests = [
            ProposalRequest(
                s.request_id, s.prompt_token_ids + s.output_token_ids, s.num_lookahead_tokens, s.params,
                s.block_table, self._generator_for(s.request_id, s.params.seed),
            )
            for s in asking
        ]
        proposals = {s.request_id: p for s, p in zip(asking, self.proposer.propose(requests))}
        scheduled = [
            dataclasses.replace(s, token_ids=s.token_ids + proposals[s.request_id].token_ids, sample=False)
            if s.request_id in proposals else s
            for s in plan.scheduled
        ]
        return dataclasses.replace(plan, scheduled=scheduled), proposals

    def _verify(
        self, hidden: torch.Tensor, metadata: AttentionMetadata, scheduled: list[ScheduledRequest],
        proposals: dict[str, Proposal], output: ModelRunnerOutput,
    ) -> None:
        """Check each guessing request's guesses against the target's logits at its last
        ``guesses + 1`` rows (lesson 10)."""
        chosen = [(i, s) for i, s in enumerate(scheduled) if s.request_id in proposals]
        rows = [
            row
            for i, s in chosen
            for row in range(metadata.query_start_loc[i + 1] - len(proposals[s.request_id].token_ids) - 1,
                             metadata.query_start_loc[i + 1])
        ]
        logits = self.model.compute_logits(hidden[rows])
        requests = [s for _, s in chosen]
        results = verify(
            logits, requests, [proposals[s.request_id] for s in requests],
            [self._generator_for(s.request_id, s.params.seed) for s in requests], self.generator,
        )
        for s, result in zip(requests, results):
            output.sampled_token_ids[s.request_id] = result.token_ids
            output.num_draft_tokens[s.request_id] = result.num_draft_tokens
            if result.logprobs is not None:
                output.logprobs[s.request_id] = result.logprobs

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
