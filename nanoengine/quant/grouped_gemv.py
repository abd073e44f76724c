"""Lesson 15: GGUF's group-quantized weights multiplied in place, on the CPU, for few rows.

A 4-bit (Q4_0, Q4_1, Q4_K) or grouped 8-bit (Q8_0, Q6_K) weight is ``w = code * scale + min``
per group of ``group_size`` inputs of one output row. With float32 activations PyTorch has no
kernel for either (its int4 kernel takes half-precision activations only), so lesson 11's
layers dequantized a whole layer, or tiles of it, before every matmul: on an AMD EPYC (Zen 1,
2 threads, float32) SmolLM2's native Q4_1 decoded 3.7 tokens/s.

Here each weight row is dequantized into a float32 scratch row that stays in the core's L1
(``code * scale + min``, group by group), and every activation row takes one dot product with
it, so the float weight never exists whole. It is ~3x the old path, not yet at the bandwidth
floor: unpacking the nibbles runs at ~2 G weights/s on the EPYC (numba does not vectorize the
short per-group loops well; a sum per group instead of a scratch row measured the same).
Each output is one fixed sequence of additions whatever the number of rows, as in
``cpu_gemv``. Tested against dequantizing and ``F.linear``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from nanoengine.profiling import profiled

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


def _float_rows(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).float().contiguous().numpy()


def int4_matmul(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for a 4-bit weight held as :class:`~nanoengine.quant.int4_kernel.Int4Weight`
    holds it off PyTorch's kernel path; ``scales``/``mins`` float32 ``[N, K/group_size]``."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], nibbles.shape[0]), np.float32)
    with profiled("nanoengine.gemv"):
        _int4_kernel(flat, nibbles.numpy(), scales.numpy(), mins.numpy(), group_size, out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)


def grouped_int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        mins: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` for codes held group-major as ``GroupedInt8Weight`` holds them;
    ``scales`` (and ``mins``) float32 ``[K/group_size, N]``."""
    flat = _float_rows(x)
    out = np.empty((flat.shape[0], codes.shape[1]), np.float32)
    no_mins = np.empty((0, 0), np.float32)
    with profiled("nanoengine.gemv"):
        _int8_kernel(flat, codes.numpy(), scales.numpy(), no_mins if mins is None else mins.numpy(), out)
    return torch.from_numpy(out).view(*x.shape[:-1], out.shape[1]).to(x.dtype)
