"""Lesson 05's kernel: PagedAttention for decode, written with numba.cuda.

Decode gives every running sequence exactly one new query token, so the work of a step is
``B * Hq`` independent dot-product-softmax-sum problems, one per (sequence, query head),
each over that sequence's ``seq_len`` cached tokens. The kernel maps them as follows.

- **One thread block per (sequence, query head)**: ``blockIdx.x`` is the sequence,
  ``blockIdx.y`` the query head. Each problem is independent, so blocks never talk to each
  other, and everything that must be shared (the query vector, the partial results) fits in
  the block's shared memory. The query heads of one GQA group read the same KV head
  ``h // (Hq // Hkv)``; they are separate blocks, which re-read K/V but keep the mapping
  simple (vLLM's kernels make the same choice for v1).
- **Threads stride over the sequence's tokens**: thread ``t`` of ``THREADS_PER_BLOCK``
  handles positions ``t, t + THREADS_PER_BLOCK, ...``. For each position it looks the
  physical block up in the block table (``block_tables[seq, pos // block_size]``, slot
  ``pos % block_size``), so the cache never has to be contiguous, and it never reads a
  block-table entry at or past the sequence's last block (those are padding).
- **Online softmax per thread**: a thread keeps a running maximum ``m``, a running sum
  ``l = sum(exp(s - m))`` and a running output ``acc = sum(exp(s - m) * v)`` over the
  tokens it has seen. When a new score raises the maximum, ``l`` and ``acc`` are rescaled
  by ``exp(m_old - m_new)``. One pass over K and V suffices, and no score ever leaves the
  thread, so the kernel needs no ``[seq_len]`` scratch buffer whatever the sequence length.
- **Reduction in shared memory**: every thread publishes ``(m, l, acc)`` to shared memory.
  The block's maximum ``M`` and total ``L = sum_t l_t * exp(m_t - M)`` are then the same
  merge of partial softmaxes, and the threads stride over the head dimension to sum
  ``acc_t[d] * exp(m_t - M)`` over ``t`` and divide by ``L``. A thread that saw no token
  has ``m = -inf``, ``l = 0``, ``acc = 0``: its weight ``exp(-inf - M)`` is exactly 0.

Static shared memory needs sizes known when the kernel compiles, so the block has a fixed
``THREADS_PER_BLOCK`` threads and the query/accumulator rows a fixed ``MAX_HEAD_DIM``
columns; any head size up to it works (the loops run to the actual ``head_dim``). With
32 threads and 256 columns the accumulators take 32 KiB of the 48 KiB a block may use
statically. A thread walks the whole head dimension of each of its tokens, so on a real
GPU a warp's loads of K/V rows do not coalesce; vLLM instead splits the head dimension
over a small thread group. This kernel favours the mapping a reader can hold in mind.

numba is imported lazily (the first call builds the kernel): importing nanoengine must not
require numba or a GPU. On CPU, numba runs the kernel under its CUDA simulator, which must
be switched on (``NUMBA_ENABLE_CUDASIM=1``) before numba is first imported.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from nanoengine.attention import torch_paged
from nanoengine.attention.metadata import AttentionMetadata

THREADS_PER_BLOCK = 32  # one warp: a block's threads stride over its sequence's tokens
MAX_HEAD_DIM = 256  # columns of the shared query and accumulator arrays


@functools.cache
def _build_kernel() -> Any:
    """Compile-on-first-launch kernel; built here so numba is imported only when needed.

    ``cuda`` and ``float32`` become module globals, not closure variables, because the CUDA
    simulator runs a kernel by swapping the ``cuda`` in the kernel's globals for its own
    thread-aware one (``cuda.threadIdx`` and friends).
    """
    global cuda, float32
    from numba import cuda, float32

    @cuda.jit
    def paged_attention_decode_kernel(q, k_cache, v_cache, block_tables, seq_lens, scale, out):
        """One decode query of one (sequence, head) against its paged K/V; see the module doc.

        Task L05.T1: given the scaled query in ``q_sh`` (shared), make each thread run an
        online softmax over positions ``tid, tid + THREADS_PER_BLOCK, ... < seq_len``,
        reading each token's K/V through ``block_tables``, with its running maximum in
        ``m``, running sum in ``l`` and running output in ``acc_sh[tid, :head_dim]``.
        Publish ``m`` and ``l`` to ``m_sh[tid]`` and ``l_sh[tid]``, then merge all threads'
        partial softmaxes so that, after a ``cuda.syncthreads()``, ``out_sh[:head_dim]``
        holds the attention output for this (sequence, head), already divided by the total.
        Invariant after each token: ``l == sum(exp(s_j - m))`` and
        ``acc_sh[tid, d] == sum(exp(s_j - m) * v_j[d])`` over the tokens ``j`` seen so far.
        """
        seq = cuda.blockIdx.x
        head = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        head_dim = q.shape[2]
        block_size = k_cache.shape[1]
        kv_head = head // (q.shape[1] // k_cache.shape[2])
        seq_len = seq_lens[seq]

        q_sh = cuda.shared.array(MAX_HEAD_DIM, float32)
        out_sh = cuda.shared.array(MAX_HEAD_DIM, float32)
        m_sh = cuda.shared.array(THREADS_PER_BLOCK, float32)
        l_sh = cuda.shared.array(THREADS_PER_BLOCK, float32)
        acc_sh = cuda.shared.array((THREADS_PER_BLOCK, MAX_HEAD_DIM), float32)

        # The scale is folded into q once, instead of into every score.
        for d in range(tid, head_dim, THREADS_PER_BLOCK):
            q_sh[d] = float32(q[seq, head, d]) * float32(scale)
        cuda.syncthreads()

        # BEGIN SOLUTION L05.T1
        m = float32(-math.inf)
        l = float32(0.0)
        for d in range(head_dim):
            acc_sh[tid, d] = float32(0.0)
        for pos in range(tid, seq_len, THREADS_PER_BLOCK):
            block = block_tables[seq, pos // block_size]
            slot = pos % block_size
            s = float32(0.0)
            for d in range(head_dim):
                s += q_sh[d] * float32(k_cache[block, slot, kv_head, d])
            m_new = max(m, s)
            # exp(-inf) == 0: the first token zeroes the (empty) history instead of NaN.
            correction = float32(math.exp(m - m_new))
            p = float32(math.exp(s - m_new))
            l = l * correction + p
            for d in range(head_dim):
                acc_sh[tid, d] = acc_sh[tid, d] * correction + p * float32(v_cache[block, slot, kv_head, d])
            m = m_new
        m_sh[tid] = m
        l_sh[tid] = l
        cuda.syncthreads()

        # Every thread merges the maxima and sums itself (THREADS_PER_BLOCK reads of shared
        # memory), which costs less than another round of barriers to broadcast them.
        m_max = m_sh[0]
        for t in range(1, THREADS_PER_BLOCK):
            m_max = max(m_max, m_sh[t])
        total = float32(0.0)
        for t in range(THREADS_PER_BLOCK):
            total += l_sh[t] * float32(math.exp(m_sh[t] - m_max))
        for d in range(tid, head_dim, THREADS_PER_BLOCK):
            o = float32(0.0)
            for t in range(THREADS_PER_BLOCK):
                o += acc_sh[t, d] * float32(math.exp(m_sh[t] - m_max))
            out_sh[d] = o / total
        cuda.syncthreads()
        # END SOLUTION

        for d in range(tid, head_dim, THREADS_PER_BLOCK):
            out[seq, head, d] = out_sh[d]

    return paged_attention_decode_kernel


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    """Shape and limit checks that need no device synchronisation."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [num_blocks, block_size, Hkv, D]; got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim}, the cache {cache_head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}, the kernel's shared-memory rows")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}]; "
                         f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32; got {block_tables.dtype} and {seq_lens.dtype}")


def _check_lengths(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Lengths must fit their block tables; checked only where the data is on the host."""
    capacity = block_tables.shape[1] * block_size
    if seq_lens.numel() and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity):
        raise ValueError(f"every seq_len must be in 1..{capacity} (max_blocks * block_size); got {seq_lens.tolist()}")


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged K/V cache (one layer).

    ``q``: ``[B, Hq, D]``; ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hkv, D]``
    with ``Hq`` a multiple of ``Hkv``; ``block_tables``: int32 ``[B, max_blocks]`` whose
    entries past a sequence's last block are never read; ``seq_lens``: int32 ``[B]``, each
    sequence's token count including the query's own token, whose K/V are already cached.
    Scores, softmax and sums run in float32; the result is ``[B, Hq, D]`` in q's dtype.

    On a real GPU the tensors reach the kernel without copies (float32 and float16 caches;
    a bfloat16 cache is converted to float32 first, since numba has no bfloat16 arrays),
    on torch's current stream. Under numba's CUDA simulator, or with CPU tensors, they are
    copied to float32 host arrays and the result is copied back.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return q.new_empty(q.shape)

    import numba
    from numba import cuda

    kernel = _build_kernel()
    grid = (batch, num_heads)
    on_gpu = q.is_cuda and not numba.config.ENABLE_CUDASIM
    if on_gpu:
        def device_array(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]):
            t = t.to(q.device)
            return cuda.as_cuda_array((t if t.dtype in dtypes else t.float()).contiguous())

        floats = (torch.float32, torch.float16)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        stream = cuda.external_stream(torch.cuda.current_stream(q.device).cuda_stream)
        kernel[grid, THREADS_PER_BLOCK, stream](
            device_array(q, floats), device_array(k_cache, floats), device_array(v_cache, floats),
            device_array(block_tables, (torch.int32,)), device_array(seq_lens, (torch.int32,)),
            float(scale), cuda.as_cuda_array(out),
        )
        return out.to(q.dtype)

    if not numba.config.ENABLE_CUDASIM and not cuda.is_available():
        raise RuntimeError("no CUDA GPU for the numba kernel: set NUMBA_ENABLE_CUDASIM=1 before numba "
                           "is first imported to run it on the CUDA simulator")

    def host(t: torch.Tensor, dtype: torch.dtype):
        return t.detach().to("cpu", dtype).contiguous().numpy()

    seq_lens_host = host(seq_lens, torch.int32)
    _check_lengths(torch.from_numpy(seq_lens_host), block_tables, k_cache.shape[1])
    out = torch.empty(q.shape, dtype=torch.float32).numpy()
    kernel[grid, THREADS_PER_BLOCK](
        host(q, torch.float32), host(k_cache, torch.float32), host(v_cache, torch.float32),
        host(block_tables, torch.int32), seq_lens_host, float(scale), out,
    )
    return torch.from_numpy(out).to(q.device, q.dtype)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The registry's entry point, with the reference's signature: a batch of pure decodes
    (one query per sequence) runs the kernel; any batch holding a prefill chunk falls back to
    the PyTorch reference, since this kernel handles one query per sequence only."""
    if metadata.max_query_len != 1:
        return torch_paged.paged_attention(q, k_cache, v_cache, metadata, scale)
    seq_lens = torch.tensor(metadata.seq_lens, dtype=torch.int32, device=q.device)
    return paged_attention_decode(q, k_cache, v_cache, metadata.block_tables, seq_lens, scale)
