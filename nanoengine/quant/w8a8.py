"""W8A8: int8 weights times int8 activations, the products summed exactly in integers.

Weight-only int8 (lesson 11) halves the bytes a decode step reads, but every code is still
converted to a float and multiplied in float arithmetic. Quantizing the activations too (one
scale per row, ``max|x| / 127``, taken fresh every step: vLLM's dynamic per-token W8A8) lets
the dot products run on bytes: ``out[m, n] = (xq[m] . wq[n]) * xscale[m] * wscale[n]``, the
integer sum exact, one float multiply per output. The weights are lesson 11's int8 (a scale
per output row); the activations lose what rounding to 255 levels per row loses.

Where each row count runs, on a CPU:
- up to :data:`DECODE_MAX_ROWS` rows, and every row count on a CPU without int8 matrix
  instructions: ``gemv_kernels.c``'s ``int8_int8_rows`` (AVX2 ``maddubs``: 32 byte products
  per instruction), numba splitting the outputs between threads; a numba loop where no C
  compiler is found;
- more rows on a CPU with VNNI or AMX: ``torch._int_mm`` (oneDNN). Without them it is a
  scalar reference loop (3.7 G int8 ops/s on an AMD EPYC Zen 1, 17x slower than a float32
  GEMM at 512 rows), so it is not used there.
Both paths quantize the activations with :func:`quantize_blocks` and scale the same way, so a
row gives the same bits alone or in a batch on either path.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange
from torch import nn

from nanoengine.model.layers.linear import DECODE_MAX_ROWS, FloatWeightMethod
from nanoengine.platform import cpu_has_int8_matmul
from nanoengine.profiling import profiled
from nanoengine.quant import native
from nanoengine.quant.base import QuantizationConfig
from nanoengine.quant.int8 import keep_int8_form

TILE = 16


# Both quotients in float64, rounded once: a fused-decode caller compiles this with fastmath (its
# flags reach callees), which may turn a float32 division into a multiply by a rounded reciprocal,
# one ulp off. A float64 quotient of float32 values is far from every float32 rounding boundary,
# so the scale is float32's exactly rounded ``max|x| / 127`` and each code ``x / scale`` rounded
# once, whatever the flags (only an exact half could round differently; random data has none).
@numba.njit(cache=True)
def quantize_blocks(x, block_size):  # noqa: ANN001, ANN202
    """Float32 rows ``[M, K]`` -> (int8 codes ``[M, K]``, float32 scales ``[M, K / block_size]``),
    one scale per block of ``block_size`` inputs of a row (``K``: one per row, as W8A8 takes
    them; 32: GGUF's groups, as W4A8 takes them): ``scale = max|x| / 127`` over the block (1
    for a block of zeros), ``code = round(x / scale)``, half to even, each quotient exactly rounded."""
    rows, k_size = x.shape
    blocks = k_size // block_size
    codes = np.empty((rows, k_size), np.int8)
    scales = np.empty((rows, blocks), np.float32)
    for m in range(rows):
        for b in range(blocks):
            first = b * block_size
            absmax = np.float32(0.0)
            for k in range(first, first + block_size):
                absmax = max(absmax, abs(x[m, k]))
            scale = np.float32(np.float64(absmax) / 127.0) if absmax > 0 else np.float32(1.0)
            for k in range(first, first + block_size):
                codes[m, k] = np.int8(np.rint(np.float64(x[m, k]) / np.float64(scale)))
            scales[m, b] = scale
    return codes, scales


@numba.njit(parallel=True, cache=True)
def _w8a8_numba(x, w, scales, out):  # noqa: ANN001, ANN202
    """The fallback where the C kernel cannot be built: the same sums, in numba's integers."""
    xq, xscale = quantize_blocks(x, x.shape[1])
    rows, k_size = x.shape
    n_size = w.shape[0]
    for tile in prange((n_size + TILE - 1) // TILE):
        for n in range(tile * TILE, min(n_size, tile * TILE + TILE)):
            for m in range(rows):
                dot = 0
                for k in range(k_size):
                    dot += np.int32(w[n, k]) * np.int32(xq[m, k])
                out[m, n] = np.float32(dot) * (xscale[m, 0] * scales[n])


def _native_w8a8_kernel(int8_int8_rows):  # noqa: ANN001, ANN202
    """``_w8a8_numba``'s signature, each tile of outputs computed by the C kernel."""

    @numba.njit(parallel=True)
    def kernel(x, w, scales, out):  # noqa: ANN001, ANN202
        xq, xscale = quantize_blocks(x, x.shape[1])
        rows, k_size = x.shape
        n_size = w.shape[0]
        for tile in prange((n_size + TILE - 1) // TILE):
            int8_int8_rows(xq.ctypes.data, xscale.ctypes.data, rows, k_size, w.ctypes.data, scales.ctypes.data,
                           tile * TILE, min(n_size, tile * TILE + TILE), out.ctypes.data, n_size)

    return kernel


# ``w8a8_kernel(x float32 [M, K], w int8 [N, K], scales float32 [N], out float32 [M, N])``,
# callable from Python and from numba-compiled code (the fused decode step).
_library = native.library()
w8a8_kernel = _native_w8a8_kernel(_library.int8_int8_rows) if _library is not None else _w8a8_numba


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for int8 codes ``qweight [N, K]`` with float32 ``scales [N]``,
    the activations quantized per row; float32 arithmetic, returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    with profiled("nanoengine.gemv"):
        if flat.shape[0] > DECODE_MAX_ROWS and cpu_has_int8_matmul():
            codes, xscale = quantize_blocks(flat.numpy(), flat.shape[1])
            dots = torch._int_mm(torch.from_numpy(codes), qweight.t())
            out = dots.float() * (torch.from_numpy(xscale) * scales)
        else:
            out = torch.empty(flat.shape[0], qweight.shape[0], dtype=torch.float32)
            w8a8_kernel(flat.numpy(), qweight.numpy(), scales.numpy(), out.numpy())
    return out.view(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


class W8A8Config(QuantizationConfig):
    name = "w8a8"

    def linear_method(self, prefix: str) -> W8A8LinearMethod:
        return W8A8LinearMethod()


class W8A8LinearMethod(FloatWeightMethod):
    """Loads the float weight, keeps lesson 11's int8 form of it (``qweight``, ``scales``
    in float32, which both paths read) and multiplies by int8 activations."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.device.type != "cpu":
            raise ValueError("quantization='w8a8' runs on the CPU; on a GPU use 'int8' or 'fp8'")
        keep_int8_form(layer)
        layer.scales = layer.scales.float()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = w8a8_matmul(x, layer.qweight, layer.scales)
        return out + bias if bias is not None else out
