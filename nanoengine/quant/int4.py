"""Weight-only int4, group-wise with a zero point, quantized as a float checkpoint loads.

Per group of ``group_size`` consecutive inputs of an output row, the 16 codes span the
group's range: ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, so each weight
comes back within half a step (``scale / 2``) of where it was. A quarter of bf16's bytes,
plus a scale and a min per group (at 64 inputs a group: half a bit per weight more).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoengine.model.layers.linear import FloatWeightMethod
from nanoengine.quant.base import QuantizationConfig
from nanoengine.quant.int4_kernel import Int4Weight

DEFAULT_GROUP_SIZE = 32


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (codes uint8 ``[N, K]`` in 0..15, scales, mins ``[N, K / group_size]``)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of the int4 group size {group_size}")
    # BEGIN SOLUTION L11.T2
    groups = weight.float().view(n, k // group_size, group_size)
    mins = groups.amin(dim=-1)
    scales = (groups.amax(dim=-1) - mins) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: any scale is exact
    codes = torch.round((groups - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.view(n, k), scales, mins
    # END SOLUTION


class Int4Config(QuantizationConfig):
    name = "int4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.group_size = group_size

    def linear_method(self, prefix: str) -> Int4LinearMethod:
        return Int4LinearMethod(self.group_size)


class Int4LinearMethod(FloatWeightMethod):
    """Loads the float weight as the plain method does, then keeps only its int4 form."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        codes, scales, mins = quantize_int4(weight.data, self.group_size)
        layer.int4 = Int4Weight(codes, scales, mins, self.group_size, weight.dtype)
        del layer.weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = layer.int4(x)
        return out + bias if bias is not None else out
