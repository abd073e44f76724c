"""Comparisons against transformers, with DESIGN.md's near-tie rule and readable failures."""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEAR_TIE = 1e-4
# The prompts the bundled SmolLM2 is checked on, against transformers and between its paths.
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@torch.inference_mode()
def hf_greedy(hf_model: torch.nn.Module, prompt: Sequence[int], num_tokens: int) -> list[int]:
    """transformers' ``generate(do_sample=False)``; EOS is masked (``min_new_tokens``) so exactly
    ``num_tokens`` come out, matching nanoengine's ``min_tokens=num_tokens``."""
    out = hf_model.generate(
        torch.tensor([list(prompt)]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def assert_same_greedy(hf_model: torch.nn.Module, prompt: Sequence[int], ours: Sequence[int], theirs: Sequence[int]) -> None:
    """Equal token for token, except that a divergence at a near-tie (top-2 logit margin
    under 1e-4 in the oracle) ends the comparison there instead of failing."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        logits = hf_model(torch.tensor([list(prompt) + list(theirs[:i])])).logits[0, -1]
        top2 = logits.topk(2).values
        if float(top2[0] - top2[1]) < NEAR_TIE:
            return
        raise AssertionError(
            f"first divergent token at output position {i}: ours {a}, transformers {b} "
            f"(margin {float(top2[0] - top2[1]):.3g})\n  ours:         {list(ours[i:i + 8])}\n"
            f"  transformers: {list(theirs[i:i + 8])}"
        )
    assert len(ours) == len(theirs), f"lengths differ: ours {len(ours)}, transformers {len(theirs)}"


def torch_quantize_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations quantized to int8 per block of ``block_size`` inputs of a row (W8A8, W4A8):
    codes ``[M, K]`` and scales ``[M, K / block_size]``."""
    blocks = x.view(x.shape[0], -1, block_size)
    absmax = blocks.abs().amax(dim=-1)
    # Quotients in float64, rounded once (PyTorch's vectorized float32 division can be one ulp
    # off a true division on some CPUs): the scale is float32's exactly rounded max|x| / 127
    scales = torch.where(absmax > 0, (absmax.double() / 127).float(), torch.ones_like(absmax))
    codes = torch.round(blocks.double() / scales.double()[..., None]).to(torch.int8)
    return codes.view(x.shape), scales
