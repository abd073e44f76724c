"""Lesson 05: the numba.cuda PagedAttention decode kernel against a dense float64 oracle.

Without a GPU the kernel runs on numba's CUDA simulator (the root conftest switches it on),
which runs one Python thread per CUDA thread: shapes here stay tiny on purpose. Every cache
slot that no sequence owns, and block 0 (the target of block-table padding), holds NaN, so
a kernel that reads past a sequence's length or follows a padding entry cannot pass.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoengine.attention.numba_cuda import MAX_HEAD_DIM, paged_attention_decode
from tests.paged import PagedBatch, paged_batch

pytestmark = [pytest.mark.l05, pytest.mark.kernel]


def _decode_batch(seq_lens, block_size, num_kv_heads, group, head_dim, dtype=torch.float32, seed=0):
    """One decode query per sequence of ``seq_lens`` tokens, on a pool written by hand (tests/paged.py)."""
    return paged_batch([(n - 1, 1) for n in seq_lens], block_size, num_kv_heads, group, head_dim, seed, dtype)


def _run(batch: PagedBatch, device: str = "cpu") -> torch.Tensor:
    q, k_cache, v_cache, block_tables, seq_lens = (x.to(device) for x in batch.decode_args())
    return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, batch.scale)


@pytest.mark.l05_t1
@settings(max_examples=8)
@given(
    seq_lens=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    block_size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    num_kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 5, 8, 12, 24]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_dense_attention(seq_lens, block_size, num_kv_heads, group, head_dim, seed):
    batch = _decode_batch(seq_lens, block_size, num_kv_heads, group, head_dim, seed=seed)
    out = _run(batch)
    assert out.shape == batch.q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), batch.expected(), atol=2e-5, rtol=2e-5)


@pytest.mark.l05_t1
def test_partly_filled_last_block():
    """13 tokens in blocks of 8 leave 3 NaN slots in the last block; 8 fill theirs; 1 uses one slot."""
    batch = _decode_batch([13, 8, 1], block_size=8, num_kv_heads=2, group=2, head_dim=8, seed=1)
    out = _run(batch)
    assert torch.isfinite(out).all(), "the kernel read a slot past a sequence's length"
    torch.testing.assert_close(out.double(), batch.expected(), atol=2e-5, rtol=2e-5)


@pytest.mark.l05_t1
@pytest.mark.parametrize("head_dim", [5, 40, MAX_HEAD_DIM])
def test_head_sizes_that_do_not_divide_the_block(head_dim):
    """40 needs a second, partial round of the threads' stride over the head dimension."""
    batch = _decode_batch([7, 33], block_size=4, num_kv_heads=1, group=1, head_dim=head_dim, seed=head_dim)
    torch.testing.assert_close(_run(batch).double(), batch.expected(), atol=2e-5, rtol=2e-5)


@pytest.mark.l05_t1
def test_bfloat16_in_bfloat16_out():
    batch = _decode_batch([9, 20], block_size=4, num_kv_heads=1, group=2, head_dim=12, dtype=torch.bfloat16, seed=2)
    out = _run(batch)
    assert out.dtype == torch.bfloat16
    # The oracle sees the same bf16 inputs; only the output's rounding to bf16 differs.
    torch.testing.assert_close(out.double(), batch.expected(), atol=2e-2, rtol=2e-2)


@pytest.mark.l05_t1
def test_kernel_equals_the_pytorch_reference():
    """Lesson 04's paged attention is the oracle the kernel replaces behind the same cache."""
    from nanoengine.attention.torch_paged import paged_attention

    batch = _decode_batch([1, 6, 17], block_size=4, num_kv_heads=2, group=3, head_dim=12, seed=3)
    out = _run(batch)
    expected = paged_attention(batch.q, *batch.pool(), batch.metadata(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(head_dim=MAX_HEAD_DIM + 1), "head_dim"),
        (dict(num_heads=3), "multiple"),
        (dict(seq_len=100), "seq_len"),
        (dict(seq_len=0), "seq_len"),
        (dict(int64_tables=True), "int32"),
    ],
)
def test_inputs_outside_the_kernels_limits_are_refused(change, message):
    head_dim = change.get("head_dim", 8)
    q = torch.randn(1, change.get("num_heads", 2), head_dim)
    cache = torch.randn(4, 4, 2, head_dim)
    tables = torch.tensor([[1, 2]], dtype=torch.int64 if change.get("int64_tables") else torch.int32)
    seq_lens = torch.tensor([change.get("seq_len", 5)], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        paged_attention_decode(q, cache, cache, tables, seq_lens, 0.5)


def test_importing_the_kernel_module_does_not_import_numba():
    code = "import sys, nanoengine.attention.numba_cuda; sys.exit(1 if 'numba' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.gpu
@pytest.mark.l05_t1
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_on_a_gpu_at_a_realistic_size(dtype):
    """Llama-like shapes (8 KV heads of 32 query heads, head_dim 128, blocks of 16), hundreds of tokens."""
    import numba

    if numba.config.ENABLE_CUDASIM or not torch.cuda.is_available():
        pytest.skip("needs a real CUDA GPU (the CUDA simulator is on, or torch sees no GPU)")
    seq_lens = [1, 17, 300, 999, 64, 513, 128, 2]
    batch = _decode_batch(seq_lens, block_size=16, num_kv_heads=8, group=4, head_dim=128, dtype=dtype, seed=4)
    out = _run(batch, "cuda")
    assert out.is_cuda and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().double(), batch.expected(), atol=tol, rtol=tol)


def test_registry_picks_the_batched_path_on_cpu_and_the_kernel_on_gpu():
    from nanoengine.attention import torch_paged
    from nanoengine.attention.registry import default_backend, get_attention_backend

    assert default_backend(torch.device("cpu")) == "torch_batched"
    assert default_backend(torch.device("cuda")) == "numba_cuda"
    assert get_attention_backend("torch") is torch_paged.paged_attention
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash")


@pytest.mark.parametrize("decode_only", [True, False])
def test_numba_backend_equals_reference_through_the_registry(decode_only):
    """Pure decode batches run the kernel; a batch with a prefill chunk falls back."""
    from nanoengine.attention.metadata import build_attention_metadata
    from nanoengine.attention.registry import get_attention_backend

    g = torch.Generator().manual_seed(0)
    block_size, kv_heads, heads, dim = 4, 2, 4, 8
    k_cache = torch.randn(6, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(6, block_size, kv_heads, dim, generator=g)
    tables, computed = [[3, 1], [5, 0, 2]], [6, 9]
    new = [1, 1] if decode_only else [1, 3]
    meta = build_attention_metadata(tables, computed, new, block_size)
    q = torch.randn(sum(new), heads, dim, generator=g)
    ours = get_attention_backend("numba_cuda")(q, k_cache, v_cache, meta, 0.3)
    reference = get_attention_backend("torch")(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
