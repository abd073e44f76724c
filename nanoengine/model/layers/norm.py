"""RMSNorm, computed in float32 whatever the model dtype (as Hugging Face does)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (x, residual, weight, eps) -> (normed, new residual): lesson 17's fused residual add.
AddNormKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; the statistics are taken in float32 to keep bf16 models stable.

    :meth:`add_norm` puts the pre-norm decoder's residual add in front of it. ``add_kernel``
    is None on the reference path (PyTorch, one step after the other); lesson 17's fast path
    sets a fused kernel there (``fused_norm.use_fused_norms``), which computes the same.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.add_kernel: AddNormKernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm on the float32 copy is HF's ``x * rsqrt(mean(x**2) + eps)`` in one fused op
        # (bit-identical), then the result is rounded before the weight, as HF does.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: a sublayer's output ``x`` joins the residual
        stream, and the sum is normalised for the next sublayer (vLLM's ``RMSNorm.forward(x,
        residual)``). The sum is taken in the stream's dtype and normalised as rounded, Hugging
        Face's order. The fused kernel writes the sum over ``x``: pass an ``x`` nothing else reads."""
        if self.add_kernel is not None:
            return self.add_kernel(x, residual, self.weight, self.eps)
        residual = x + residual
        return self(residual), residual
