"""Lesson 15: GGUF's group-quantized weights multiplied in place, on the CPU, for few rows.

A 4-bit (Q4_0, Q4_1, Q4_K) or grouped 8-bit (Q8_0, Q6_K) weight is ``w = code * scale + min``
per group of ``group_size`` inputs of one output row. With float32 activations PyTorch has no
kernel for either (its int4 kernel takes half-precision activations only), so lesson 11's
layers dequantized a whole layer, or tiles of it, before every matmul: on an AMD EPYC (Zen 1,
2 threads, float32) SmolLM2's native Q4_1 decoded 3.7 tokens/s.

Here the codes are multiplied where they lie, so the float weight never exists whole. The
4-bit codes go to a small C kernel (``int4_gemv.c``, built on first use by ``native``): numba
does not vectorize nibble unpacking (its integer arithmetic widens to 64 bits, which AVX2
cannot convert to floats in a vector) and ran at ~2 G weights/s on the EPYC; the C kernel's
AVX2 loop takes ``scale * dot(codes, x) + min * sum(x)`` per group at ~7-8 G weights/s on the
same 2 threads. Where no C compiler is found, the numba kernel below (each row dequantized
into a float32 scratch row in L1, then a dot product per activation row) runs instead. The
8-bit codes are numba's: converting int8 to float vectorizes.
Each output is one fixed sequence of additions whatever the number of rows, as in
``cpu_gemv``. Tested against dequantizing and ``F.linear``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from nanoengine.profiling import profiled
from nanoengine.quant import native
from nanoengine.quant.w8a8 import quantize_blocks

TILE = 16


@numba.njit(parallel=True, fastmath=True, cache=True)
def _int4_kernel(x, nibbles, scales, mins, group_size, out):  # noqa: ANN001, ANN202
    """``nibbles`` uint8 ``[N, K/2]``: in group ``g``, byte ``j`` holds the codes of inputs
    ``j`` (low half) and ``j + group_size/2`` (high half); ``scales``, ``mins`` float32
    ``[N, K/group_size]``."""
    rows, k_size = x.shape
    n_size, groups = scales.shape
    half = group_size // 2
    for tile in prange((n_size + TILE - 1) // TILE):
        row = np.empty(k_size, np.float32)
        for n in range(tile * TILE, min(n_size, tile * TILE + TILE)):
            for g in range(groups):
                scale, shift, first = scales[n, g], mins[n, g], g * group_size
                for j in range(half):
                    byte = np.int32(nibbles[n, g * half + j])
                    row[first + j] = np.float32(byte & 15) * scale + shift
                    row[first + half + j] = np.float32(byte >> 4) * scale + shift
            for m in range(rows):
                acc = np.float32(0.0)
                for k in range(k_size):
                    acc += row[k] * x[m, k]
                out[m, n] = acc


@numba.njit(parallel=True, cache=True)
def _w4a8_kernel(x, nibbles, scales, mins, group_size, out):  # noqa: ANN001, ANN202
    """W4A8, ``_int4_kernel``'s weights times activations quantized to int8 per group (the C
    kernel's sums where it cannot be built): ``Σ_g scale · xscale · (codes · xq) + min · Σx``."""
    rows, k_size = x.shape
    n_size, groups = scales.shape
    half = group_size // 2
    xq, xscale = quantize_blocks(x, group_size)
    xsum = _group_sums(x, group_size)
    for tile in prange((n_size + TILE - 1) // TILE):
        for n in range(tile * TILE, min(n_size, tile * TILE + TILE)):
            for m in range(rows):
                total, shift = np.float32(0.0), np.float32(0.0)
                for g in range(groups):
                    shift += mins[n, g] * xsum[m, g]
                for g in range(groups):
                    dot = 0
                    for j in range(half):
                        byte = np.int32(nibbles[n, g * half + j])
                        dot += (byte & 15) * np.int32(xq[m, g * group_size + j])
                        dot += (byte >> 4) * np.int32(xq[m, g * group_size + half + j])
                    total += np.float32(dot) * (scales[n, g] * xscale[m, g])
                out[m, n] = total + shift


@numba.njit(parallel=True, fastmath=True, cache=True)
def _int8_kernel(x, codes, scales, mins, group_size, out):  # noqa: ANN001, ANN202
    """``codes`` int8 group-major ``[K/group_size, N, group_size]``; ``scales`` float32
    ``[K/group_size, N]``; ``mins`` the same, or an empty array for symmetric types."""
    rows, k_size = x.shape
    groups, n_size = codes.shape[0], codes.shape[1]
    has_mins = mins.shape[0] > 0
    for tile in prange((n_size + TILE - 1) // TILE):
        row = np.empty(k_size, np.float32)
        for n in range(tile * TILE, min(n_size, tile * TILE + TILE)):
            for g in range(groups):
                scale = scales[g, n]
                shift = mins[g, n] if has_mins else np.float32(0.0)
                for j in range(group_size):
                    row[g * group_size + j] = np.float32(codes[g, n, j]) * scale + shift
            for m in range(rows):
                acc = np.float32(0.0)
                for k in range(k_size):
                    acc += row[k] * x[m, k]
                out[m, n] = acc


@numba.njit(parallel=True, cache=True)
def _int8_int8_kernel(x, codes, scales, mins, group_size, out):  # noqa: ANN001, ANN202
    """``_int8_kernel``'s weights times activations quantized to int8 per group (the C kernel's
    sums where it cannot be built)."""
    rows, k_size = x.shape
    groups, n_size = codes.shape[0], codes.shape[1]
    has_mins = mins.shape[0] > 0
    xq, xscale = quantize_blocks(x, group_size)
    xsum = _group_sums(x, group_size)
    for tile in prange((n_size + TILE - 1) // TILE):
        for n in range(tile * TILE, min(n_size, tile * TILE + TILE)):
            for m in range(rows):
                total = np.float32(0.0)
                for g in range(groups):
                    dot = 0
                    for j in range(group_size):
                        dot += np.int32(codes[g, n, j]) * np.int32(xq[m, g * group_size + j])
                    total += np.float32(dot) * (scales[g, n] * xscale[m, g])
                    if has_mins:
                        total += mins[g, n] * xsum[m, g]
                out[m, n] = total


@numba.njit(fastmath=True, cache=True)
def _group_sums(x, group_size):  # noqa: ANN001, ANN202
    """``[rows, K / group_size]``: each row's sum over each group (the mins multiply it)."""
    rows, k_size = x.shape
    sums = np.zeros((rows, k_size // group_size), np.float32)
    for m in range(rows):
        for k in range(k_size):
            sums[m, k // group_size] += x[m, k]
    return sums


def _in_c(rows_function, int8_activations: bool):  # noqa: ANN001, ANN202
    """A kernel with the numba kernels' signature ``(x, codes, scales, mins, group_size, out)``
    that hands each tile of outputs to ``rows_function`` of ``gemv_kernels.c``: with the float32
    activations, or (``int8_activations``) with them quantized to int8 per group here first."""

    @numba.njit(parallel=True)
    def kernel(x, codes, scales, mins, group_size, out):  # noqa: ANN001, ANN202
        rows, k_size = x.shape
        n_size = out.shape[1]
        xsum = _group_sums(x, group_size)
        if int8_activations:  # a constant: numba compiles one branch
            activations, xscale = quantize_blocks(x, group_size)
        else:
            activations, xscale = x, xsum  # xscale goes as NULL
        mins_pointer = mins.ctypes.data if mins.size > 0 else np.uintp(0)  # NULL: no mins
        for tile in prange((n_size + TILE - 1) // TILE):
            rows_function(activations.ctypes.data, xscale.ctypes.data if int8_activations else np.uintp(0),
                          xsum.ctypes.data, rows, k_size, codes.ctypes.data, scales.ctypes.data, mins_pointer,
                          group_size, tile * TILE, min(n_size, tile * TILE + TILE), out.ctypes.data, n_size)

    return kernel


# The kernels every caller uses (the fused decode step too), all ``(x, codes, scales, mins,
# group_size, out)``: C where it builds, else numba's.
_library = native.library()
if _library is not None:
    int4_kernel, w4a8_kernel = _in_c(_library.int4_rows, False), _in_c(_library.int4_rows, True)
    grouped_int8_kernel = _in_c(_library.int8_grouped_rows, False)
    grouped_int8_int8_kernel = _in_c(_library.int8_grouped_rows, True)
else:
    int4_kernel, w4a8_kernel = _int4_kernel, _w4a8_kernel
    grouped_int8_kernel, grouped_int8_int8_kernel = _int8_kernel, _int8_int8_kernel


def _float_rows(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).float().contiguous().numpy()


def int4_matmul(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int, int8_activations: bool = False) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for a 4-bit weight held as :class:`~nanoengine.quant.int4_kernel.Int4Weight`
    holds it off PyTorch's kernel path; ``scales``/``mins`` float32 ``[N, K/group_size]``.
    ``int8_activations``: W4A8, the activations quantized to int8 per group first."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], nibbles.shape[0]), np.float32)
    kernel = w4a8_kernel if int8_activations else int4_kernel
    with profiled("nanoengine.gemv"):
        kernel(flat, nibbles.numpy(), scales.contiguous().numpy(), mins.contiguous().numpy(), group_size, out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)


def grouped_int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        mins: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for codes held group-major as ``GroupedInt8Weight`` holds them;
    ``scales`` (and ``mins``) float32 ``[K/group_size, N]``. ``int8_activations``: the
    activations are quantized to int8 per group first (GGUF's blocks at decode)."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], codes.shape[1]), np.float32)
    no_mins = np.empty((0, 0), np.float32)
    kernel = grouped_int8_int8_kernel if int8_activations else grouped_int8_kernel
    with profiled("nanoengine.gemv"):
        kernel(flat, codes.numpy(), scales.numpy(), no_mins if mins is None else mins.numpy(), codes.shape[2], out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)
