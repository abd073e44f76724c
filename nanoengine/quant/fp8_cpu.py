"""FP8 weights widened on a CPU fast enough to use: a lookup table, compiled by numba.

PyTorch converts ``float8_e4m3fn`` to bf16 one element at a time (~2 ns each here), which
for SmolLM2's 106 M linear weights is ~230 ms a decode step. But an 8-bit code has only 256
values, and every one of them is exact in bf16 (3 mantissa bits, a narrower exponent range):
so widening is a table lookup, ``bits = table[code]``, which numba runs over all cores at
memory speed. The table holds the *bit patterns* of the target dtype (int16 for bf16/f16,
int32 for float32), because numba has no bf16 type; the result is viewed back as the dtype.
Importing this module imports numba: :mod:`nanoengine.quant.fp8` imports it on first use.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

_CHUNK = 1 << 16


@numba.njit(parallel=True, cache=True)
def _lookup(codes: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    n = codes.size
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK)):
            out[i] = table[codes[i]]


def widen(values: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float8_e4m3fn, contiguous, CPU) as ``dtype``, via ``table = fp8.widen_table(dtype)``."""
    out = torch.empty(values.shape, dtype=table.dtype)
    _lookup(values.view(torch.uint8).reshape(-1).numpy(), table.numpy(), out.reshape(-1).numpy())
    return out.view(dtype)
