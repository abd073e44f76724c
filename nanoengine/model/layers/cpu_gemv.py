"""Lesson 15: a decode matmul that streams the weights at the memory's speed.

A decode step multiplies a handful of rows (one per running sequence) by every weight of the
model, so its matmuls do ~1 multiply-add per weight byte read: they are bound by how fast the
weights stream from RAM, not by arithmetic. PyTorch's CPU ``F.linear`` with one row reads a
float32 weight at about half of what the memory gives (13 GB/s of ~28 on an AMD EPYC, 2
threads), a bf16 one slower still, because its GEMM kernels are tuned for many rows.

:func:`matmul_rows` is the simplest kernel that reaches the bandwidth floor: the output
features are cut in tiles of :data:`TILE` weight rows, spread over the threads, and every
activation row takes its dot product with every weight row of the tile while the tile is in
the core's cache, so the weight is read from RAM once per call. A float32 weight is read in
place; a bf16 or int8 row is first widened to float32 into a scratch row (bf16 bit patterns
shifted into place, int8 codes converted). Measured on an AMD EPYC (Zen 1, 2 threads), a
3072 x 576 float32 weight: 27.7 GB/s at one row against ``F.linear``'s 13 GB/s; each extra row
costs a dot product, so from ~16 rows on (prefill) PyTorch's GEMM, which uses the cores' full
arithmetic, is faster again.

**Batch invariance.** Each output element is one dot product over ``K`` in a fixed order
that depends on ``K`` alone, never on how many rows came in or which tile a thread took. So a
token's result is bit-identical whether it ran alone, beside 63 others, or inside a prefill
chunk, the property a batch-invariant mode needs from its matmuls (PyTorch's GEMMs pick
their blocking, and so their summation order, by the number of rows).

Weights are read as they are stored: float32; bfloat16 as its raw 16-bit patterns (numba has
no bf16 type: the high half of a float32 is exactly a bf16); int8 codes with one float32
scale per output row (lesson 11's weight-only int8).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from numba import prange, types
from numba.extending import overload
from torch import nn

from nanoengine.model.layers.linear import DECODE_MAX_ROWS, LinearMethodBase
from nanoengine.platform import cpu_has_native_bf16
from nanoengine.profiling import profiled

# Weight rows per work item: 16 rows of 576 float32 (SmolLM2's hidden size) are 36 KiB, which
# stays in the core's L1/L2 while every activation row passes over it.
TILE = 16

# How each stored weight dtype reaches the kernel (numba reads numpy arrays).
_KERNEL_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.int16, torch.int8: torch.int8}


def widen_row(src: np.ndarray, dst: np.ndarray) -> None:
    """Copy one stored row into a float32 row (numba compiles the overload for each dtype)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(widen_row, inline="always")
def _widen_row_impl(src, dst):  # noqa: ANN001, ANN202 (numba types, not Python ones)
    if src.dtype == types.int16:  # bfloat16 bit patterns: they are the high half of a float32

        def widen_bf16(src, dst):  # noqa: ANN001, ANN202
            bits = dst.view(np.uint32)
            for d in range(src.shape[0]):
                bits[d] = np.uint32(np.uint16(src[d])) << np.uint32(16)

        return widen_bf16

    def convert(src, dst):  # noqa: ANN001, ANN202 (float32 copies, int8 codes convert exactly)
        for d in range(src.shape[0]):
            dst[d] = np.float32(src[d])

    return convert


@numba.njit(parallel=True, fastmath=True, cache=True)
def _matmul_float32(x, w, scales, out):  # noqa: ANN001, ANN202
    """``out[m, n] = scales[n] * dot(x[m], w[n])`` for a float32 ``w``: read in place."""
    num_rows, k_size = x.shape
    n_size = w.shape[0]
    for tile_index in prange((n_size + TILE - 1) // TILE):
        first = tile_index * TILE
        for m in range(num_rows):
            for n in range(first, min(first + TILE, n_size)):
                acc = np.float32(0.0)
                for k in range(k_size):
                    acc += w[n, k] * x[m, k]
                out[m, n] = acc * scales[n]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _matmul_widened(x, w, scales, out):  # noqa: ANN001, ANN202
    """The same for bf16 bit patterns or int8 codes: each weight row is widened once into a
    float32 scratch row (in L1), then every activation row takes its dot product with it."""
    num_rows, k_size = x.shape
    n_size = w.shape[0]
    for tile_index in prange((n_size + TILE - 1) // TILE):
        first = tile_index * TILE
        row = np.empty(k_size, np.float32)
        for n in range(first, min(first + TILE, n_size)):
            widen_row(w[n], row)
            for m in range(num_rows):
                acc = np.float32(0.0)
                for k in range(k_size):
                    acc += row[k] * x[m, k]
                out[m, n] = acc * scales[n]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _matmul_int8_one_row(x, w, scales, out):  # noqa: ANN001, ANN202
    """One activation row times int8 codes, each code converted as it is read: ~1.3x the
    widened kernel at one row on the EPYC (no scratch row to write and read back); from two
    rows on, widening once and reading the scratch row for each is faster."""
    k_size = x.shape[1]
    n_size = w.shape[0]
    for tile_index in prange((n_size + TILE - 1) // TILE):
        for n in range(tile_index * TILE, min(tile_index * TILE + TILE, n_size)):
            acc = np.float32(0.0)
            for k in range(k_size):
                acc += np.float32(w[n, k]) * x[0, k]
            out[0, n] = acc * scales[n]


def matmul_stored(x, w, scales, out):  # noqa: ANN001, ANN202
    """``out = (x @ wᵀ) * scales`` on a weight as stored (float32, bf16 bits or int8 codes):
    the kernel for its dtype and row count. Callable from numba-compiled code only."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(matmul_stored)
def _matmul_stored_impl(x, w, scales, out):  # noqa: ANN001, ANN202
    if w.dtype == types.float32:
        return lambda x, w, scales, out: _matmul_float32(x, w, scales, out)
    if w.dtype == types.int8:

        def int8(x, w, scales, out):  # noqa: ANN001, ANN202
            if x.shape[0] == 1:
                _matmul_int8_one_row(x, w, scales, out)
            else:
                _matmul_widened(x, w, scales, out)

        return int8
    return lambda x, w, scales, out: _matmul_widened(x, w, scales, out)


@numba.njit(cache=True)
def _matmul_any(x, w, scales, out):  # noqa: ANN001, ANN202
    matmul_stored(x, w, scales, out)


def matmul_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]ᵀ`` (times ``scales [N]`` per output, for int8 codes), in
    float32 arithmetic, returned in ``x``'s dtype. ``weight``: float32, bfloat16 or int8."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    if scales is None:
        scales = _ones(weight.shape[0])
    with profiled("nanoengine.gemv"):
        _matmul_any(
            flat.numpy(), kernel_array(weight), scales.float().contiguous().numpy(),
            out.numpy(),
        )
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


@functools.cache
def _ones(size: int) -> torch.Tensor:
    """The scales of a float weight (kept, so a step allocates none)."""
    return torch.ones(size, dtype=torch.float32)


def kernel_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a weight or KV pool as the numba kernels read it (bf16 as its bits)."""
    return tensor.view(_KERNEL_DTYPES[tensor.dtype]).numpy()


def gemv_supported(weight_dtype: torch.dtype) -> bool:
    return weight_dtype in _KERNEL_DTYPES


class GemvLinearMethod(LinearMethodBase):
    """Wraps a layer's loaded method: up to ``max_rows`` rows (decode) go through
    :func:`matmul_rows` on the layer's stored weight, more rows (prefill) through the wrapped
    method's own matmul, which is faster there (oneDNN or MKL use the cores' full arithmetic).
    ``max_rows=None``: every row count runs the kernel (see :func:`max_rows_for`).

    Invariant: the layer keeps what the wrapped method reads (``weight``, or int8 ``qweight``
    and ``scales``); this method only reads them.
    """

    def __init__(self, inner: LinearMethodBase, max_rows: int | None) -> None:
        self.inner = inner
        self.max_rows = max_rows

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        raise TypeError("GemvLinearMethod wraps a loaded layer's method; build the layer with that method")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.max_rows is not None and rows > self.max_rows:
            return self.inner.apply(layer, x, bias)
        qweight = getattr(layer, "qweight", None)
        if qweight is not None:
            out = matmul_rows(x, qweight, layer.scales)
        else:
            out = matmul_rows(x, layer.weight)
        return out + bias if bias is not None else out


def warm_up() -> None:
    """Compile the kernel for every weight dtype (or load it from numba's cache), so the first
    step does not pay for it."""
    x = torch.zeros(1, 4)
    for dtype in _KERNEL_DTYPES:
        matmul_rows(x, torch.zeros(2, 4, dtype=dtype), torch.ones(2))


def max_rows_for(stored_dtype: torch.dtype) -> int | None:
    """The most rows the kernel should take for a weight stored as ``stored_dtype``: beyond
    :data:`DECODE_MAX_ROWS` PyTorch's own matmul wins for float32, and for bf16 and int8 on a
    CPU with AVX-512 (oneDNN's bf16 and the int8 kernels use it). Without it (AVX2 only, an
    AMD EPYC Zen 1) PyTorch emulates both row by row: a 512-token prefill of SmolLM2 ran at 36
    (bf16) and 17 (int8) tokens/s, so there the kernel takes every row count (None)."""
    if stored_dtype == torch.float32 or cpu_has_native_bf16():
        return DECODE_MAX_ROWS
    return None


def wrappable(method: object) -> bool:
    """Methods whose layer holds a weight the kernel reads: the plain one (and the tied head),
    lesson 15's oneDNN-packed one (it keeps its dense ``weight``) and lesson 11's int8."""
    from nanoengine.model.layers.linear import UnquantizedLinearMethod
    from nanoengine.model.layers.onednn import OneDNNPackedLinearMethod
    from nanoengine.quant.int8 import Int8LinearMethod

    return isinstance(method, UnquantizedLinearMethod | OneDNNPackedLinearMethod | Int8LinearMethod)


def use_gemv(model: nn.Module) -> int:
    """Wrap every linear layer the kernel can read in :class:`GemvLinearMethod` (taking the
    rows :func:`max_rows_for` says); returns how many. Call after loading (and after oneDNN
    packing)."""
    warm_up()
    wrapped = 0
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        stored = getattr(module, "qweight", getattr(module, "weight", None))
        if wrappable(method) and stored is not None and gemv_supported(stored.dtype):
            module.linear_method = GemvLinearMethod(method, max_rows_for(stored.dtype))
            wrapped += 1
    return wrapped
