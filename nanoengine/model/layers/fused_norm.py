"""Lesson 17: RMSNorm fused with the residual add in front of it.

A pre-norm decoder layer ends each sublayer by adding its output to the residual stream and
normalising the sum for the next sublayer (``RMSNorm.add_norm``):

    residual = x + residual
    normed = weight * rms_norm(residual)

In PyTorch that is an ``add``, then ``F.rms_norm``, which on a CPU dispatches a ``pow``, a
``mean``, an ``add``, an ``rsqrt``, a ``mul`` and their casts: 27 operator calls on one row,
each a call from Python and most a pass over the rows; a SmolLM2 step runs it 60 times.
:func:`rms_norm_residual` does it in one call and one pass: each row is read once into a
float32 scratch row, summed, stored as the new residual and normalised while it is still in
the core's cache. It writes the sum over ``x`` (a sublayer's output, which nobody reads again), so the new
residual costs no allocation. vLLM's CUDA kernel ``fused_add_rms_norm`` does the same, and
its models carry the residual from layer to layer in the same way.

Rounding follows the unfused path: the sum is stored in the stream's dtype and the stored
(rounded) value is what gets normalised, so the new residual is bit-identical to ``x +
residual``; the normed row is computed in float32 and rounded once, where the unfused path
rounds before the weight and after it (within one bf16 rounding of each other). Each row is
reduced alone, in a fixed order, so a token gets the same bits in any batch.
"""

from __future__ import annotations

import logging
import math

import numba
import numpy as np
import torch
from torch import nn

from nanoengine.model.fused_decode import _store_row
from nanoengine.model.layers.cpu_gemv import kernel_array, widen_row
from nanoengine.model.layers.norm import RMSNorm
from nanoengine.profiling import profiled

logger = logging.getLogger("nanoengine")

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel reads and writes (float16: PyTorch)


# One thread: at decode sizes the work is a few microseconds, less than waking a second one.
@numba.njit(fastmath=True, cache=True)
def _add_rms_norm(x, residual, weight, eps, normed):  # noqa: ANN001, ANN202 (numba types)
    """Per row ``m``: ``x[m] += residual[m]`` (rounded to x's dtype), then ``normed[m] =
    x[m] / rms(x[m]) * weight``. Arrays ``[M, H]`` (``weight``: ``[H]``) in the stored dtype:
    float32, or bf16 as int16 bit patterns (``widen_row`` reads them, ``_store_row`` rounds
    to them)."""
    rows, size = x.shape
    w = np.empty(size, np.float32)
    widen_row(weight, w)
    row = np.empty(size, np.float32)
    scratch = np.empty(size, np.float32)
    for m in range(rows):
        # BEGIN SOLUTION L17.T1
        widen_row(x[m], row)
        widen_row(residual[m], scratch)
        for d in range(size):
            row[d] += scratch[d]
        _store_row(row, x[m])  # the new residual, in the stream's dtype ...
        widen_row(x[m], row)  # ... and normalised as stored, as the unfused path does
        total = np.float32(0.0)
        for d in range(size):
            total += row[d] * row[d]
        inv = np.float32(1.0 / math.sqrt(total / size + eps))
        for d in range(size):
            row[d] = row[d] * inv * w[d]
        _store_row(row, normed[m])
        # END SOLUTION


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rms_norm(x + residual), x + residual)`` in one pass, for ``x`` and
    ``residual`` of shape ``[..., H]`` and one dtype (float32 or bfloat16), ``weight [H]``.

    In place: ``x`` is overwritten with the sum and returned as the new residual (when ``x``
    is not contiguous, a contiguous copy of it is); ``residual`` is only read. At one row the
    conversions to numpy cost more than the kernel (~16 of ~28 µs a call on an AMD EPYC), so
    none is made that is not needed."""
    rows = _rows(x)
    normed = torch.empty_like(rows)
    with profiled("nanoengine.rms_norm"):
        _add_rms_norm(kernel_array(rows), kernel_array(_rows(residual)), kernel_array(weight), np.float32(eps),
                      kernel_array(normed))
    if x.dim() != 2:
        return normed.view(x.shape), rows.view(x.shape)
    return normed, rows


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the kernel reads it: contiguous, ``[M, H]`` (views where it can)."""
    tensor = tensor.contiguous()
    return tensor if tensor.dim() == 2 else tensor.view(-1, tensor.shape[-1])


def warm_up(dtype: torch.dtype) -> None:
    """Compile the kernel for ``dtype`` (or load it from numba's cache) on one small row."""
    rms_norm_residual(torch.ones(1, 4, dtype=dtype), torch.ones(1, 4, dtype=dtype), torch.ones(4, dtype=dtype), 1e-6)


def use_fused_norms(model: nn.Module) -> int:
    """Give every plain :class:`RMSNorm` of ``model`` whose weight the kernel reads the fused
    residual add (its ``add_kernel``); returns how many. In a student copy where task L17.T1
    is not written yet, the norms keep the unfused PyTorch path, with a warning, so the
    lessons before it keep working."""
    norms = [m for m in model.modules() if type(m) is RMSNorm and m.weight.dtype in _KERNEL_DTYPES]
    try:
        for dtype in {norm.weight.dtype for norm in norms}:
            warm_up(dtype)
    except NotImplementedError as todo:
        logger.warning("the fused RMSNorm is not written yet (%s); the norms add the residual unfused", todo)
        return 0
    for norm in norms:
        norm.add_kernel = rms_norm_residual
    return len(norms)
