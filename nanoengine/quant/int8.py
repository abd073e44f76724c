"""Weight-only int8, one scale per output channel, quantized as a float checkpoint loads.

``scale = max|w| / 127`` per output row and ``q = round(w / scale)``: symmetric, so zero stays
exactly zero, and each weight comes back within half a step (``scale / 2``). Half of bf16's
bytes. The matmul is PyTorch's ``_weight_int8pack_mm``, which multiplies the activations by
the int8 weight and scales each output once, never building the float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.model.layers.linear import FloatWeightMethod
from nanoengine.quant.base import QuantizationConfig


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (int8 codes ``[N, K]``, float32 scales ``[N]``)."""
    # BEGIN SOLUTION L11.T1
    absmax = weight.float().abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    codes = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales
    # END SOLUTION


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.float()[:, None]


class Int8Config(QuantizationConfig):
    name = "int8"

    def linear_method(self, prefix: str) -> Int8LinearMethod:
        return Int8LinearMethod()


def keep_int8_form(layer: nn.Module) -> None:
    """Replace the layer's loaded float ``weight`` by int8 codes ``qweight`` and ``scales``
    (in the weight's dtype)."""
    codes, scales = quantize_int8(layer.weight.data)
    dtype = layer.weight.dtype
    del layer.weight
    layer.register_buffer("qweight", codes, persistent=False)
    layer.register_buffer("scales", scales.to(dtype), persistent=False)


class Int8LinearMethod(FloatWeightMethod):
    """Loads the float weight as the plain method does, then keeps only its int8 form."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        keep_int8_form(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, dequantize_int8(layer.qweight, layer.scales).to(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), layer.qweight, layer.scales)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out
