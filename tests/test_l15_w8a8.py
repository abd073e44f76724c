"""Lesson 15: W8A8, int8 activations times int8 weights, equals its integer oracle.

- ``quantize_blocks`` gives ``round(x / (max|x| / 127))`` per block of a row, half to even,
  with each quotient exactly rounded, also when a fastmath caller (the fused decode step)
  compiles it;
- the C kernel (AVX2 and its tail loop) and numba's fallback equal the exact integer dot
  products, scaled, on any shape;
- a row gives the same bits alone, in a batch, and on the ``torch._int_mm`` path that CPUs
  with VNNI or AMX take for prefill;
- an engine on it runs the fused decode step (``test_l15_gemv``'s engine test).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nanoengine.model.layers.linear import DECODE_MAX_ROWS
from nanoengine.quant import w8a8
from nanoengine.quant.int8 import quantize_int8
from tests.oracles import torch_quantize_blocks

pytestmark = pytest.mark.l15

KERNELS = {"C": w8a8.w8a8_kernel, "numba": w8a8._w8a8_numba}


@numba.njit(fastmath=True)
def _one_value_blocks_in_a_fastmath_caller(x):  # noqa: ANN001, ANN202
    """As a fastmath caller with a constant block size compiles it: a float32 ``/ 127`` there
    became a multiply by a rounded reciprocal, one ulp off (the fused step's flags reach callees)."""
    return w8a8.quantize_blocks(x, 1)


@given(rows=st.integers(1, 6), block_size=st.integers(1, 40), blocks=st.integers(1, 3), zero_block=st.booleans(),
       seed=st.integers(0, 2**16))
@example(rows=1, block_size=1, blocks=1, zero_block=False, seed=282)  # a float32 division one ulp off (CI, once)
def test_activations_quantize_with_exactly_rounded_quotients(rows, block_size, blocks, zero_block, seed):
    x = torch.randn(rows, block_size * blocks, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_block:
        x[0, :block_size] = 0
    expected_codes, expected_scales = torch_quantize_blocks(x, block_size)
    results = [w8a8.quantize_blocks(x.numpy(), block_size)]
    if block_size == 1:
        results.append(_one_value_blocks_in_a_fastmath_caller(x.numpy()))
    for codes, scales in results:
        assert torch.equal(torch.from_numpy(codes), expected_codes)
        assert torch.equal(torch.from_numpy(scales), expected_scales)


@pytest.mark.parametrize("kernel", KERNELS)
@given(rows=st.integers(1, DECODE_MAX_ROWS + 1), n=st.integers(1, 2 * w8a8.TILE + 3), k=st.integers(1, 100),
       seed=st.integers(0, 2**16))
def test_the_kernels_equal_the_exact_integer_sums(kernel, rows, n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    qweight, scales = quantize_int8(torch.randn(n, k, generator=generator))
    x = torch.randn(rows, k, generator=generator)
    out = np.empty((rows, n), np.float32)
    KERNELS[kernel](x.numpy(), qweight.numpy(), scales.numpy(), out)
    codes, xscale = torch_quantize_blocks(x, k)
    expected = (codes.double() @ qweight.double().T) * xscale.double() * scales.double()
    torch.testing.assert_close(torch.from_numpy(out).double(), expected, rtol=1e-6, atol=1e-6)


def test_a_row_gets_the_same_bits_alone_in_a_batch_and_on_int_mm(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    qweight, scales = quantize_int8(torch.randn(45, 200, generator=generator))
    x = torch.randn(DECODE_MAX_ROWS + 4, 200, generator=generator)
    alone = w8a8.w8a8_matmul(x[7:8], qweight, scales)
    few = w8a8.w8a8_matmul(x[:DECODE_MAX_ROWS], qweight, scales)
    monkeypatch.setattr(w8a8, "cpu_has_int8_matmul", lambda: True)  # the VNNI/AMX prefill path
    many = w8a8.w8a8_matmul(x, qweight, scales)
    assert torch.equal(alone[0], few[7]) and torch.equal(alone[0], many[7])


def test_w8a8_is_refused_off_the_cpu_by_name():
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="w8a8"):
        w8a8.W8A8LinearMethod().process_weights_after_loading(layer)
