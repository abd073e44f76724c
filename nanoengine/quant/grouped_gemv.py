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


@numba.njit(parallel=True, fastmath=True, cache=True)
def _int8_kernel(x, codes, scales, mins, out):  # noqa: ANN001, ANN202
    """``codes`` int8 group-major ``[K/group_size, N, group_size]``; ``scales`` float32
    ``[K/group_size, N]``; ``mins`` the same, or an empty array for symmetric types."""
    rows, k_size = x.shape
    groups, n_size, group_size = codes.shape
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


@numba.njit(fastmath=True, cache=True)
def _group_sums(x, group_size):  # noqa: ANN001, ANN202
    """``[rows, K / group_size]``: each row's sum over each group (the mins multiply it)."""
    rows, k_size = x.shape
    sums = np.zeros((rows, k_size // group_size), np.float32)
    for m in range(rows):
        for k in range(k_size):
            sums[m, k // group_size] += x[m, k]
    return sums


def _native_int4_kernel(int4_rows):  # noqa: ANN001, ANN202
    """``_int4_kernel``'s signature, each tile of outputs computed by the C kernel."""

    @numba.njit(parallel=True)
    def kernel(x, nibbles, scales, mins, group_size, out):  # noqa: ANN001, ANN202
        rows, k_size = x.shape
        n_size = scales.shape[0]
        xsum = _group_sums(x, group_size)
        for tile in prange((n_size + TILE - 1) // TILE):
            int4_rows(x.ctypes.data, xsum.ctypes.data, rows, k_size, nibbles.ctypes.data, scales.ctypes.data,
                      mins.ctypes.data, group_size, tile * TILE, min(n_size, tile * TILE + TILE), out.ctypes.data,
                      n_size)

    return kernel


def _native_int8_kernel(int8_rows):  # noqa: ANN001, ANN202
    """``_int8_kernel``'s signature, each tile of outputs computed by the C kernel."""

    @numba.njit(parallel=True)
    def kernel(x, codes, scales, mins, out):  # noqa: ANN001, ANN202
        rows, k_size = x.shape
        n_size, group_size = codes.shape[1], codes.shape[2]
        xsum = _group_sums(x, group_size)
        mins_pointer = mins.ctypes.data if mins.shape[0] > 0 else np.uintp(0)  # NULL: no mins
        for tile in prange((n_size + TILE - 1) // TILE):
            int8_rows(x.ctypes.data, xsum.ctypes.data, rows, k_size, codes.ctypes.data, scales.ctypes.data,
                      mins_pointer, group_size, tile * TILE, min(n_size, tile * TILE + TILE), out.ctypes.data,
                      n_size)

    return kernel


# The kernels every caller uses (the fused decode step too): C where it builds, else numba's.
_library = native.library()
int4_kernel = _native_int4_kernel(_library.int4_rows) if _library is not None else _int4_kernel
grouped_int8_kernel = _native_int8_kernel(_library.int8_grouped_rows) if _library is not None else _int8_kernel


def _float_rows(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).float().contiguous().numpy()


def int4_matmul(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for a 4-bit weight held as :class:`~nanoengine.quant.int4_kernel.Int4Weight`
    holds it off PyTorch's kernel path; ``scales``/``mins`` float32 ``[N, K/group_size]``."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], nibbles.shape[0]), np.float32)
    with profiled("nanoengine.gemv"):
        int4_kernel(flat, nibbles.numpy(), scales.contiguous().numpy(), mins.contiguous().numpy(), group_size, out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)


def grouped_int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        mins: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for codes held group-major as ``GroupedInt8Weight`` holds them;
    ``scales`` (and ``mins``) float32 ``[K/group_size, N]``."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], codes.shape[1]), np.float32)
    no_mins = np.empty((0, 0), np.float32)
    with profiled("nanoengine.gemv"):
        grouped_int8_kernel(flat, codes.numpy(), scales.numpy(), no_mins if mins is None else mins.numpy(), out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)
