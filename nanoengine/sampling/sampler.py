"""The sampler: a batch of logits -> one token per row, and its logprobs, in vLLM's (v1) order.

1. logprobs, when a row asks, of the *raw* logits (vLLM's default);
2. logit bias, banned tokens and penalties: they can change the argmax, so every row gets them;
3. greedy rows take the argmax;
4. random rows: temperature, min-p, top-k, top-p, softmax, then one exact draw.

Every step works on the whole batch with per-row tensors. A seeded row draws its noise with
its own generator, so its tokens depend on its own logits and seed only, never on the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nanoengine.sampling.logprobs import TokenLogprobs, gather_logprobs
from nanoengine.sampling.processors import (
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    token_counts,
)
from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    generator: torch.Generator | None = None  # a seeded request's own; None = draw from the shared generator
    banned_token_ids: Sequence[int] = ()  # masked to -inf (EOS/stop tokens before min_tokens)
    prompt_token_ids: Sequence[int] = ()  # only needed when the row has a repetition penalty
    output_token_ids: Sequence[int] = ()  # only needed when the row has any penalty


@dataclasses.dataclass(slots=True)
class SamplerOutput:
    """One chosen token per row, and its logprobs where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows whose params.logprobs is None


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], shared_generator: torch.Generator) -> SamplerOutput:
    """Pick the next token of each row of ``logits`` (``[B, V]``) as ``rows[i]`` says.

    Unseeded random rows draw their noise from ``shared_generator``, all in one call.
    """
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    raw_logprobs = logits[asked].float().log_softmax(dim=-1)
    logits = processed_logits(logits, rows)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        probs = sampling_probs(logits[random_rows], [rows[i].params for i in random_rows])
        tokens[random_rows] = draw_tokens(probs, [rows[i].generator for i in random_rows], shared_generator)
    token_ids = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if asked:
        gathered = gather_logprobs(raw_logprobs, [token_ids[i] for i in asked], [rows[i].params.logprobs for i in asked])
        for i, row_logprobs in zip(asked, gathered):
            logprobs[i] = row_logprobs
    return SamplerOutput(token_ids, logprobs)


def processed_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Float32 logits after logit bias, banned tokens and penalties: what greedy rows take
    the argmax of and random rows go on to shape into a distribution."""
    logits = apply_logit_bias(logits.float(), [row.params.logit_bias for row in rows])
    return _penalise(_ban(logits, [row.banned_token_ids for row in rows]), rows)


def target_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution :func:`sample` draws each row's token from, ``[B, V]``: one-hot at the
    argmax for a greedy row. Speculative decoding (lesson 10) needs it whole, to check
    guesses against it."""
    logits = processed_logits(logits, rows)
    probs = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        probs[random_rows] = sampling_probs(logits[random_rows], [rows[i].params for i in random_rows])
    return probs


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each random row is drawn from: temperature, then min-p, top-k, top-p (vLLM's order).

    A truncation that no row uses is skipped: it would not change the distribution, only cost a sort.
    """
    logits = apply_temperature(logits, _per_row(params, "temperature", logits.device))
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, _per_row(params, "min_p", logits.device))
    if any(p.top_k > 0 for p in params):
        vocab = logits.shape[-1]  # a k beyond the vocabulary keeps everything (and may not fit a long)
        logits = apply_top_k(logits, torch.tensor([min(p.top_k, vocab) for p in params], device=logits.device))
    if any(p.top_p < 1 for p in params):
        logits = apply_top_p(logits, _per_row(params, "top_p", logits.device))
    return logits.softmax(dim=-1)


def draw_tokens(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None], shared_generator: torch.Generator
) -> torch.Tensor:
    """Draw one token per row of ``probs`` (``[n, V]``) exactly from it: ``argmax(probs / q)``, ``q ~ Exp(1)``.

    The exponential race: ``q_i / p_i`` is exponential with rate ``p_i``, and the smallest of
    independent exponentials is the ``i``-th with probability ``p_i / sum(p)``. It needs no
    cumulative sum and no per-row call, except for rows with their own generator
    (``generators[j]``), which draw their noise row with it. The rows whose generator is
    None draw one ``[n, V]`` block from ``shared_generator``.
    """
    noise = torch.empty_like(probs)
    vocab = probs.shape[-1]
    shared = [j for j, generator in enumerate(generators) if generator is None]
    if shared:
        block = torch.empty(len(shared), vocab, device=shared_generator.device)
        noise[shared] = block.exponential_(generator=shared_generator).to(probs.device)
    for j, generator in enumerate(generators):
        if generator is not None:
            noise[j] = torch.empty(vocab, device=generator.device).exponential_(generator=generator).to(probs.device)
    return (probs / noise).argmax(dim=-1)


def _per_row(params: Sequence[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)


def _ban(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """-inf at every banned (row, token), in one ``index_put``: neither argmax nor a draw can pick it."""
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    if not rows:
        return logits
    tokens = [t for ids in banned for t in ids]
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def _has_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1


def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalties for the rows that set one; a batch without any (the usual case) builds no counts."""
    penalised = [i for i, row in enumerate(rows) if _has_penalty(row.params)]
    if not penalised:
        return logits
    vocab, device = logits.shape[-1], logits.device
    chosen = [rows[i] for i in penalised]
    params = [row.params for row in chosen]
    updated = apply_penalties(
        logits[penalised],
        token_counts([row.prompt_token_ids for row in chosen], vocab, device) > 0,
        token_counts([row.output_token_ids for row in chosen], vocab, device),
        _per_row(params, "presence_penalty", device),
        _per_row(params, "frequency_penalty", device),
        _per_row(params, "repetition_penalty", device),
    )
    return logits.index_copy(0, torch.tensor(penalised, device=device), updated)
