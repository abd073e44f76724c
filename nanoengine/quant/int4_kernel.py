"""The group-wise 4-bit matmul that int4, GPTQ, AWQ and GGUF's 4-bit types all run on.

Every 4-bit format here comes down to the same numbers: a code ``q`` in 0..15 per weight, and
per group of ``group_size`` consecutive inputs of one output row a ``scale`` and a ``min``, so
that ``w = q * scale + min`` (an integer zero point ``z`` is ``min = -z * scale``). Formats
differ only in how they pack these bits on disk.

On a CPU, PyTorch ships a kernel for exactly this (``_weight_int4pack_mm_for_cpu``, written
for torchao, using the AVX-512 instructions): it takes the codes packed two per byte and,
per group and output, ``(scale, zero)`` with ``w = (q - 8) * scale + zero``; so
``zero = min + 8 * scale``. It needs the output size to be a multiple of 16, and it pays
only for half-precision activations: in float32 it is slower than dequantizing the layer and
calling a float32 matmul (1.6 against 1.0 ms for one row of a 3072 x 576 weight, 49 against
1.9 ms for 32). Elsewhere (float32, other devices, odd sizes) :class:`Int4Weight` keeps the
codes two to a byte too and dequantizes one layer at a time before a plain matmul, the
reference the kernel is tested against; on a CPU, up to :data:`DECODE_MAX_ROWS` rows (decode)
go instead to lesson 15's numba kernel (``grouped_gemv``), which reads the nibbles in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.model.layers.linear import DECODE_MAX_ROWS

KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """``codes [N, K]`` (0..15), ``scales``/``mins [N, K / group_size]`` -> float32 ``[N, K]``."""
    n, k = codes.shape
    grouped = codes.float().view(n, k // group_size, group_size)
    return (grouped * scales.float()[..., None] + mins.float()[..., None]).view(n, k)


def kernel_applies(output_size: int, group_size: int, device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and output_size % 16 == 0
        and group_size in KERNEL_GROUP_SIZES
    )


class Int4Weight(nn.Module):
    """A ``[N, K]`` weight held as 4-bit codes with a scale and min per group; ``forward(x) = x @ Wᵀ``.

    ``int8_activations`` (GGUF's blocks on the fast path, as llama.cpp and vLLM run them): off
    PyTorch's kernel, up to ``DECODE_MAX_ROWS`` rows quantize the activations to int8 per group
    and sum the products in integers (W4A8, lesson 15); more rows still dequantize the weight.

    Invariant: ``K % group_size == 0`` and ``group_size`` is even. Scales and zeros are kept in the
    activations' dtype, which is what the kernel reads (a bf16 scale rounds like a bf16 weight
    would).
    """

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, dtype: torch.dtype,
        int8_activations: bool = False,
    ) -> None:
        super().__init__()
        n, k = codes.shape
        if k % group_size or group_size % 2:
            raise ValueError(f"input size {k} is not a multiple of the group size {group_size}, or that is odd")
        self.group_size = group_size
        self.int8_activations = int8_activations
        self.use_kernel = kernel_applies(n, group_size, codes.device, dtype)
        if self.use_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            zeros = mins.float() + 8 * scales.float()
            # [K / group_size, N, 2]: per group, per output, (scale, zero)
            scales_and_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        else:
            # per group, byte j holds code j (low half) and code j + group_size / 2 (high half),
            # as GGUF's blocks do: both halves then meet consecutive inputs
            grouped = codes.to(torch.uint8).view(n, k // group_size, 2, group_size // 2)
            self.register_buffer("nibbles", (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).view(n, k // 2),
                                 persistent=False)
            self.register_buffer("scales", scales.to(dtype), persistent=False)
            self.register_buffer("mins", mins.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel and x.is_cpu and x.numel() // x.shape[-1] <= DECODE_MAX_ROWS:
            # float32 activations (lesson 15): a numba kernel reads the nibbles in place
            from nanoengine.quant.grouped_gemv import int4_matmul

            return int4_matmul(x, self.nibbles, self.scales.float(), self.mins.float(), self.group_size,
                               self.int8_activations)
        if not self.use_kernel:
            halves = self.nibbles.view(self.nibbles.shape[0], -1, self.group_size // 2)
            codes = torch.cat([halves & 0xF, halves >> 4], dim=-1).flatten(1)
            return F.linear(x, dequantize_int4(codes, self.scales, self.mins, self.group_size).to(x.dtype))
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.view(*x.shape[:-1], out.shape[-1])
