"""A draft model: a smaller model with the target's tokenizer guesses ``k`` tokens, one
cheap forward pass each (lesson 10).

The draft keeps its own paged KV cache, laid out exactly like the target's: same number
of blocks, same block size, and each request reads and writes it through the *target's*
block table, so the scheduler allocates for both at once and the draft needs no
bookkeeping of its own beyond how many of each request's tokens its cache holds. Its
guesses past that point are written into the request's lookahead slots, which the target
then overwrites with its own K/V during verification (the draft's cache is a separate
tensor, so the target never reads a draft value).

For SmolLM2 there is no smaller model with the same tokenizer to hand, so the default draft
is *self-speculation*: the target's own first ``draft_num_layers`` layers, its final norm and
its head (as LayerSkip does), sharing its weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.attention.registry import AttentionFn
from nanoengine.attention.torch_paged import PagedAttention, PagedKVCache
from nanoengine.sampling.sampler import draw_tokens, sampling_probs
from nanoengine.spec_decode.proposer import Proposal, ProposalRequest


class EarlyExit:
    """The target's first ``num_layers`` layers, then its final norm and head: a draft that
    costs ``num_layers / num_hidden_layers`` of the target and no extra weights."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        total = model.config.num_hidden_layers
        if not 1 <= num_layers <= total:
            raise ValueError(f"draft_num_layers must be between 1 and the model's {total} layers; got {num_layers}")
        self.model = model
        self.num_layers = num_layers

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        return self.model(input_ids, positions, attn, num_layers=self.num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


class DraftModelProposer:
    """Guesses from a draft model (vLLM's ``method: "draft_model"``).

    Invariant: ``num_computed[r]`` tokens of request ``r`` have their K/V in the draft's
    cache (its verified tokens only; guesses beyond are rewritten before they are read).
    """

    def __init__(
        self, model, kv_cache: PagedKVCache, attention_fn: AttentionFn, shared_generator: torch.Generator
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attention_fn = attention_fn
        self.shared_generator = shared_generator
        self.device = kv_cache.k.device
        self.num_computed: dict[str, int] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.num_computed.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> list[Proposal]:
        """Catch the draft's cache up with every request's verified tokens (one batched
        forward, usually a few tokens each, the whole prompt the first time), guess from the
        last position, then feed each guess back for the next, one batched step at a time."""
        starts = [self.num_computed.get(r.request_id, 0) for r in requests]
        chunks = [r.token_ids[start:] for r, start in zip(requests, starts)]
        logits = self._forward(requests, chunks, starts)
        for r in requests:
            self.num_computed[r.request_id] = len(r.token_ids)
        guesses: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))
        while True:
            tokens, step_probs = self._draw(logits, [requests[i] for i in active])
            for i, token, p in zip(active, tokens, step_probs):
                guesses[i].append(token)
                probs[i].append(p)
            active = [i for i in active if len(guesses[i]) < requests[i].max_tokens]
            if not active:
                break
            logits = self._forward(
                [requests[i] for i in active], [[guesses[i][-1]] for i in active],
                [len(requests[i].token_ids) + len(guesses[i]) - 1 for i in active],
            )
        return [
            Proposal(g, None if r.params.greedy else torch.stack(p))
            for r, g, p in zip(requests, guesses, probs)
        ]

    def _forward(self, requests: list[ProposalRequest], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run ``chunks[i]`` at positions ``starts[i]..`` through the draft; the logits of each
        chunk's last position, ``[len(requests), V]``."""
        metadata = build_attention_metadata(
            [r.block_table for r in requests], starts, [len(c) for c in chunks], self.kv_cache.block_size, self.device
        )
        input_ids = torch.tensor([t for c in chunks for t in c], device=self.device)
        positions = torch.tensor([p for c, s in zip(chunks, starts) for p in range(s, s + len(c))], device=self.device)
        hidden = self.model(input_ids, positions, PagedAttention(self.kv_cache, metadata, self.attention_fn))
        return self.model.compute_logits(hidden[[end - 1 for end in metadata.query_start_loc[1:]]])

    def _draw(self, logits: torch.Tensor, requests: list[ProposalRequest]) -> tuple[list[int], list[torch.Tensor | None]]:
        """One guess per row: the argmax for a greedy request (a certain guess), else a draw
        from the draft's distribution shaped by the request's own temperature and truncations
        (any distribution keeps the result exact; one close to the target's is accepted more)."""
        tokens = logits.argmax(dim=-1)
        step_probs: list[torch.Tensor | None] = [None] * len(requests)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            p = sampling_probs(logits[random_rows].float(), [requests[i].params for i in random_rows])
            drawn = draw_tokens(p, [requests[i].generator for i in random_rows], self.shared_generator)
            tokens[random_rows] = drawn
            for j, i in enumerate(random_rows):
                step_probs[i] = p[j]
        return tokens.tolist(), step_probs
