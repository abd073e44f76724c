"""RMSNorm, computed in float32 whatever the model dtype (as Hugging Face does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; the statistics are taken in float32 to keep bf16 models stable."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm on the float32 copy is HF's ``x * rsqrt(mean(x**2) + eps)`` in one fused op
        # (bit-identical), then the result is rounded before the weight, as HF does.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)
