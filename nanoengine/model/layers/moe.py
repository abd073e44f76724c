"""Mixture of experts (lesson 16): a router picks ``top_k`` of ``num_experts`` SwiGLU MLPs per token.

Each token's output is the weighted sum of its chosen experts' outputs. Only ``top_k`` of
the experts run for a token, so a model holds many times the weights it computes with: the
compute of a small model, the knowledge of a large one.

Two ways to run the experts, equal up to float rounding:

- :func:`experts_reference` loops over tokens and their choices: one token, one expert, one
  small matmul at a time. Slow, and plainly what the math says.
- :func:`experts_grouped` sorts the (token, choice) pairs by expert, so each expert runs once,
  on all of its tokens at once: ``num_experts`` matmuls of many rows instead of
  ``T * top_k`` matmuls of one. That is the engine's path.

Expert parallelism (lesson 12's tensor-parallel ranks): rank ``r`` of ``n`` holds experts
``[r*E/n, (r+1)*E/n)`` whole. Every rank sees every token (hidden states are replicated
between layers), runs only its own experts, and the group's all-reduce sums the parts: the
same one collective a row-parallel layer ends with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.parallel.state import current_layout, divide


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then each token's ``top_k`` best: ``(weights [T, k] float32,
    expert ids [T, k])``. ``renormalize`` rescales a token's k weights to sum to 1 (Mixtral
    always does; Qwen2-MoE when its config says ``norm_topk_prob``)."""
    # BEGIN SOLUTION L16.T1
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
    # END SOLUTION


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on rows ``x``: ``w2 @ (silu(gate) * up)`` with gate and up stacked in ``w13``."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def experts_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_expert: int = 0
) -> torch.Tensor:
    """The readable path: for every token, for every one of its choices, run that expert on
    that token alone. ``w13 [E_local, 2*I, H]``, ``w2 [E_local, H, I]`` hold experts
    ``first_expert ..``; choices of experts held elsewhere contribute nothing here."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, expert in zip(weights[t].tolist(), ids[t].tolist()):
            local = expert - first_expert
            if 0 <= local < w13.shape[0]:
                out[t] += weight * _swiglu(x[t : t + 1], w13[local], w2[local])[0]
    return out


def experts_grouped(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, first_expert: int = 0
) -> torch.Tensor:
    """The batched path: group the ``T * k`` (token, choice) pairs by expert and run each of
    this rank's experts once, on all of its rows. Same contract as :func:`experts_reference`."""
    # BEGIN SOLUTION L16.T2
    num_local, top_k = w13.shape[0], ids.shape[1]
    local = ids.flatten() - first_expert                 # [T*k]: pair p is token p // k's choice
    order = torch.argsort(local, stable=True)            # pairs sorted by expert
    # expert e's pairs are order[bounds[e] : bounds[e+1]] (other ranks' experts fall outside)
    bounds = torch.searchsorted(local[order], torch.arange(num_local + 1, device=ids.device)).tolist()
    out = torch.zeros_like(x)
    for expert in range(num_local):
        if bounds[expert] == bounds[expert + 1]:
            continue
        pairs = order[bounds[expert] : bounds[expert + 1]]
        tokens = pairs // top_k
        rows = _swiglu(x[tokens], w13[expert], w2[expert])
        out.index_add_(0, tokens, rows * weights.flatten()[pairs, None].to(rows.dtype))
    return out
    # END SOLUTION


class FusedMoE(nn.Module):
    """A layer's experts as two stacked weights, split by expert across tensor-parallel ranks.

    ``w13 [E_local, 2*I, H]`` (each expert's gate rows, then its up rows) and
    ``w2 [E_local, H, I]``; this rank holds experts ``first_expert .. first_expert + E_local``.
    ``forward(x [T, H], router_logits [T, E]) -> [T, H]``, summed over the group.
    """

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})")
        self.tp = current_layout().tp
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.num_local_experts = divide(num_experts, self.tp.size, "the number of experts")
        self.first_expert = self.tp.rank * self.num_local_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, intermediate_size, dtype=dtype), requires_grad=False
        )

    def expert_ids(self) -> range:
        """The global ids of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def shards_of(self, param_name: str) -> list[tuple[int, str]]:
        """What a complete load of ``w13`` or ``w2`` fills: every local expert's parts."""
        parts = ("down",) if param_name == "w2" else ("gate", "up")
        return [(expert, part) for expert in self.expert_ids() for part in parts]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        """Copy one expert's checkpoint matrix (``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``)
        into its slot; the caller skips experts another rank holds."""
        expert, part = shard
        target = param.data[expert - self.first_expert]
        if part != "down":
            size = self.intermediate_size
            target = target.narrow(0, 0 if part == "gate" else size, size)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"expert {expert}'s {part} matrix has shape {tuple(loaded.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        out = experts_grouped(x, self.w13, self.w2, weights, ids, self.first_expert)
        return self.tp.all_reduce(out)
