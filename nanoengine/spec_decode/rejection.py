"""The rule that makes speculation exact (Leviathan et al. 2023; Chen et al. 2023).

The draft proposed ``d_1..d_k``, drawing ``d_j`` from ``q_j``; the target, in one pass, gave
``p_j`` at every position (each given the guesses before it). Walk the guesses in order:
accept ``d_j`` with probability ``min(1, p_j(d_j) / q_j(d_j))``. At the first rejection, emit
a token drawn from the *residual* ``max(0, p_j - q_j)``, renormalised, and stop; if every guess
was accepted, emit a bonus token drawn from ``p_{k+1}``. Every emitted token is then
distributed exactly as the target would have sampled it: accepting covers ``min(p, q)`` of
the mass, and the residual supplies precisely the part ``p - min(p, q)`` that is missing.
"""

from __future__ import annotations

import torch


def speculative_distributions(
    target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject rule as numbers: ``(accept [k], final [k + 1, V])``.

    ``target_probs``: ``[k + 1, V]``, ``p_1..p_{k+1}``; ``draft_probs``: ``[k, V]`` (None:
    each guess was certain, ``q_j`` one-hot at ``d_j``); ``draft_token_ids``: ``[k]``.
    ``accept[j]``: the probability of accepting guess ``j`` once the ones before it were;
    ``final[j]``: what the emitted token is drawn from when exactly ``j`` guesses were
    accepted (the residual for ``j < k``, ``p_{k+1}`` for ``j = k``).
    """
    k = draft_token_ids.shape[0]
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:k]).scatter_(1, draft_token_ids[:, None], 1.0)
    # BEGIN SOLUTION L10.T2
    rows = torch.arange(k, device=target_probs.device)
    p_guess = target_probs[rows, draft_token_ids]
    q_guess = draft_probs[rows, draft_token_ids]
    accept = (p_guess / q_guess).clamp(max=1.0)
    residual = (target_probs[:k] - draft_probs).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q: the guess is always accepted and the residual never drawn from; keep it a distribution
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), target_probs[:k])
    final = torch.cat([residual, target_probs[k:]])
    # END SOLUTION
    return accept, final
