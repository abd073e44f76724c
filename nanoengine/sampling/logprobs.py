"""Log-probabilities of sampled tokens, in the shape vLLM returns them.

vLLM (v1) reports the log-probabilities of the *raw* model distribution (before penalties,
temperature or truncation), so a caller sees what the model believed, not what the
sampler's settings made of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token first, then the top-k (as vLLM returns them)."""

    token_ids: list[int]  # [chosen, top1, top2, ...]; the chosen token may repeat among the top
    logprobs: list[float]  # same order
    ranks: list[int]  # 1-based rank in the vocabulary (1 = most likely); ties: 1 + number of strictly larger logprobs


def gather_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Row i of logprobs ([N, V], float32, already log_softmax-ed): chosen token token_ids[i]
    plus the num_top[i] most likely.

    One ``topk`` serves the whole batch (the largest ``num_top``); each row keeps its own prefix.
    """
    # BEGIN SOLUTION L09.T2
    num_rows, vocab = logprobs.shape
    if num_rows == 0:
        return []
    chosen_ids = torch.tensor(list(token_ids), device=logprobs.device)[:, None]
    chosen = logprobs.gather(-1, chosen_ids)
    chosen_rank = (logprobs > chosen).sum(-1, keepdim=True) + 1
    top, top_ids = logprobs.topk(min(max(num_top), vocab), dim=-1)
    # Every logprob larger than a top-k value is itself in the top-k, before it: counting
    # within the top-k gives the rank in the vocabulary.
    top_rank = (top[:, None, :] > top[:, :, None]).sum(-1) + 1
    ids = torch.cat([chosen_ids, top_ids], dim=-1).tolist()
    values = torch.cat([chosen, top], dim=-1).tolist()
    ranks = torch.cat([chosen_rank, top_rank], dim=-1).tolist()
    return [
        TokenLogprobs(ids[i][: k + 1], values[i][: k + 1], ranks[i][: k + 1]) for i, k in enumerate(num_top)
    ]
    # END SOLUTION
