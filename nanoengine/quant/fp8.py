"""FP8 (E4M3) weight-only: 8-bit floats with one scale per output channel.

E4M3 has 3 mantissa bits, so unlike int8 its step grows with the value: every weight keeps
about the same *relative* precision (within 1/16 of itself, half a unit in the last place),
and small weights are not flattened to zero. ``scale = max|w| / 448`` maps each row's
largest weight to E4M3's largest finite value.

A CPU has no FP8 arithmetic, so there the weight is widened to the activations' dtype for
each matmul (emulation: the memory of FP8, not its speed), by a table lookup compiled with
numba (``fp8_cpu.py``; PyTorch's own conversion is ~20x slower), and each output is scaled
after the matmul. On a GPU with FP8 tensor cores
(compute capability 8.9+: Ada, Hopper) the activations are quantized per token to FP8 too
and ``torch._scaled_mm`` multiplies natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.model.layers.linear import FloatWeightMethod
from nanoengine.quant.base import QuantizationConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (E4M3 values ``[N, K]``, float32 scales ``[N]``)."""
    absmax = weight.float().abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    return (weight.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return values.float() * scales.float()[:, None]


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def widen_table(dtype: torch.dtype) -> torch.Tensor:
    """The bit pattern, in ``dtype``, of each of the 256 E4M3 values (NaN codes included)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    return codes.to(dtype).view(_BITS[dtype])


def native_fp8_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def linear_method(self, prefix: str) -> Fp8LinearMethod:
        return Fp8LinearMethod()


class Fp8LinearMethod(FloatWeightMethod):
    """Loads the float weight as the plain method does, then keeps only its FP8 form."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        values, scales = quantize_fp8(layer.weight.data)
        dtype = layer.weight.dtype
        del layer.weight
        layer.register_buffer("fp8_weight", values, persistent=False)
        layer.register_buffer("fp8_scales", scales.to(dtype), persistent=False)
        # the 256 values' bit patterns in the activations' dtype, for the CPU's table lookup
        layer.register_buffer("fp8_table", widen_table(dtype), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if native_fp8_available(x.device):
            return _scaled_mm(x, layer.fp8_weight, layer.fp8_scales, bias)
        if x.device.type == "cpu":
            from nanoengine.quant.fp8_cpu import widen  # numba, compiled on first use

            weight = widen(layer.fp8_weight, layer.fp8_table, x.dtype)
        else:
            weight = layer.fp8_weight.to(x.dtype)
        out = F.linear(x, weight) * layer.fp8_scales
        return out + bias if bias is not None else out


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """FP8 x FP8 on tensor cores: activations scaled per token, weights per channel."""
    flat = x.reshape(-1, x.shape[-1])
    x_scales = (flat.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    x_fp8 = (flat.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(
        x_fp8, weight.t(), scale_a=x_scales, scale_b=scales.float().view(1, -1), bias=bias, out_dtype=x.dtype
    )
    return out.view(*x.shape[:-1], out.shape[-1])
