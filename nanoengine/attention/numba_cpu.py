"""Lesson 15: PagedAttention on the CPU as a numba kernel, the fast path's attention.

The batched PyTorch path (``torch_batched``) serves all decode rows of a step with a few big
operations, but each of them makes a pass over memory: gather every sequence's blocks into
one padded tensor, copy it again for the matmul's layout, mask the padding, mask V again
(unwritten slots may hold NaN), convert the probabilities. This kernel reads each cached
K/V row exactly once, straight through the block table, and writes nothing but the output.

- **Work items**: one per (sequence, KV head), spread over the CPU's threads with
  ``numba.prange``. The ``Hq // Hkv`` query heads of a GQA group share the item, so each K
  and V row is read once for the whole group.
- **Two passes over the sequence**: scores of every key for the group's heads (``[group,
  seq_len]`` scratch), a softmax over them in float32, then the probability-weighted sum of
  V. (Lesson 05's GPU kernel keeps an online softmax instead, because a GPU thread has no
  room for a row of scores; a CPU thread has.) Only positions ``< seq_len`` are read, so the
  padding of the block table and the unwritten tail of the last block are never touched.
- **bfloat16 without bfloat16**: numba has no bf16 type, so the cache is handed over as its
  raw 16-bit patterns (``view(torch.int16)``) and each row is widened to float32 by shifting
  the bits into the high half of a 32-bit word, which is exactly what bf16 is.

Decode rows (one query) go to the kernel; prefill chunks (many queries of one sequence) are
matmul-shaped work, which the reference's batched matmuls already do well (PyTorch's fused
``scaled_dot_product_attention`` measured slower here for 128-token chunks). Tested against
``torch_paged.paged_attention``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

from nanoengine.attention.metadata import AttentionMetadata
from nanoengine.attention.torch_batched import batched_decode_attention
from nanoengine.attention.torch_paged import attend_sequence
from nanoengine.model.layers.cpu_gemv import kernel_array, widen_row
from nanoengine.profiling import profiled

_CACHE_DTYPES = (torch.bfloat16, torch.float32)  # what the kernel reads (float16: PyTorch path)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _decode_kernel(q, k_cache, v_cache, block_tables, seq_lens, scale, out):  # noqa: ANN001, ANN202
    """``q``, ``out``: float32 ``[B, Hq, D]``; caches ``[num_blocks, block_size, Hkv, D]``."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    for item in prange(num_seqs * num_kv_heads):
        seq, kv_head = item // num_kv_heads, item % num_kv_heads
        seq_len = seq_lens[seq]
        first_head = kv_head * group
        # BEGIN SOLUTION L15.T1
        scores = np.empty((group, seq_len), np.float32)
        row = np.empty(head_dim, np.float32)
        for pos in range(seq_len):
            widen_row(k_cache[block_tables[seq, pos // block_size], pos % block_size, kv_head], row)
            for g in range(group):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += q[seq, first_head + g, d] * row[d]
                scores[g, pos] = dot * scale
        for g in range(group):
            peak = scores[g].max()
            total = np.float32(0.0)
            for pos in range(seq_len):
                weight = math.exp(scores[g, pos] - peak)
                scores[g, pos] = weight
                total += weight
            for pos in range(seq_len):
                scores[g, pos] /= total
        acc = np.zeros((group, head_dim), np.float32)
        for pos in range(seq_len):
            widen_row(v_cache[block_tables[seq, pos // block_size], pos % block_size, kv_head], row)
            for g in range(group):
                weight = scores[g, pos]
                for d in range(head_dim):
                    acc[g, d] += weight * row[d]
        out[seq, first_head : first_head + group] = acc
        # END SOLUTION


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``q``: ``[B, Hq, D]``, one query per sequence at its last position; returns ``[B, Hq, D]``
    in q's dtype. Caches of a dtype the kernel cannot read (float16) take the batched PyTorch path."""
    if k_cache.dtype not in _CACHE_DTYPES:
        return batched_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    out = np.empty(q.shape, np.float32)
    with profiled("nanoengine.attention"):
        _decode_kernel(
            q.float().numpy(), kernel_array(k_cache), kernel_array(v_cache),
            block_tables.numpy(), seq_lens.numpy(), np.float32(scale), out,
        )
    return torch.from_numpy(out).to(q.dtype)


@torch.library.custom_op("nanoengine::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """:func:`decode_attention` as a ``torch.library`` custom op
    (``torch.ops.nanoengine.decode_attention``), for code that ``torch.compile`` traces: with
    its fake implementation the compiler sees one opaque call of known output shape instead of
    tracing into numba (lesson 17; ``docs/bench/n13d_compile_probe.py`` compiles SmolLM2's
    module path around it). The engine calls :func:`decode_attention` itself: the op's
    dispatch costs ~80 us a call on an AMD EPYC Zen 1, more than the kernel at small batches."""
    return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


@decode_attention_op.register_fake
def _decode_attention_shape(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """What the compiler needs to know of the op without running it: a new ``[B, Hq, D]``
    tensor in q's dtype."""
    return torch.empty_like(q)


def warm_up(dtype: torch.dtype) -> None:
    """Compile the kernel for ``dtype``'s caches (or load it from numba's cache) by running it
    on one two-token sequence: the first decode step then runs at full speed."""
    if dtype not in _CACHE_DTYPES:
        return
    cache = torch.zeros(1, 2, 1, 4, dtype=dtype)
    # The argument types the engine passes (int32 block tables, int64 lengths): one specialization.
    decode_attention(torch.zeros(1, 1, 4), cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([2]), 0.5)


def batch_invariant_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference's signature and result, every query row through the decode kernel as a
    sequence of its own that ends at the row's position: row ``t`` of sequence ``i`` sees keys
    ``0 .. position(t)`` through ``i``'s block table.

    The attention half of batch-invariant mode (``nanoengine.model.batch_invariant``): a row's
    output is one computation over its own query and keys in an order fixed by its position,
    the same whatever else is in the step, however its prompt was chunked, and whether its keys
    were written in this step, in an earlier chunk or by another request (a prefix-cache hit).
    :func:`paged_attention` gives a prefill chunk to the reference's matmuls instead, whose
    rounding depends on the chunk's length. The price is prefill's: each row reads its keys
    itself, where a chunk's matmul reads them once for all of its rows.
    """
    if k_cache.dtype not in _CACHE_DTYPES:  # the PyTorch fallback would not be invariant
        raise TypeError(f"batch-invariant attention reads {', '.join(map(str, _CACHE_DTYPES))} caches, "
                        f"not {k_cache.dtype}")
    if q.shape[0] == metadata.num_seqs:  # one query per sequence: the rows are the sequences
        tables, row_lens = metadata.block_tables, torch.tensor(metadata.seq_lens)
    else:
        starts = metadata.query_start_loc
        rows_of = torch.tensor([b - a for a, b in zip(starts, starts[1:])])
        # the keys a row sees: seq_len - (end - row) + 1, with end its sequence's first row after it
        seq_lens, ends = (torch.tensor(v).repeat_interleave(rows_of) for v in (metadata.seq_lens, starts[1:]))
        row_lens = seq_lens - ends + torch.arange(q.shape[0]) + 1
        tables = metadata.block_tables[torch.arange(metadata.num_seqs).repeat_interleave(rows_of)]
    # Contiguous always: q is a view into the fused q/k/v output, which numpy calls contiguous
    # only when it has one row, and numba compiles (and vectorizes) each layout differently.
    return decode_attention(q.contiguous(), k_cache, v_cache, tables, row_lens, scale)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference's signature and result: decode rows through the kernel in one call,
    each prefill chunk through the reference's per-sequence code (batched matmuls already)."""
    starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
    decode = [i for i in range(metadata.num_seqs) if starts[i + 1] - starts[i] == 1]
    out = torch.empty_like(q)
    if len(decode) == metadata.num_seqs:  # a pure decode step: rows are the sequences, in order
        return decode_attention(q, k_cache, v_cache, metadata.block_tables, torch.tensor(seq_lens), scale)
    if decode:
        rows = torch.tensor([starts[i] for i in decode])
        tables = metadata.block_tables[torch.tensor(decode)]
        out[rows] = decode_attention(q[rows], k_cache, v_cache, tables, torch.tensor([seq_lens[i] for i in decode]), scale)
    for i in sorted(set(range(metadata.num_seqs)) - set(decode)):
        attend_sequence(q, k_cache, v_cache, metadata, i, scale, out)
    return out
