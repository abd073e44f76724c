"""Batch-invariant mode (``LLM(..., batch_invariant=True)``, as vLLM names it): a request's
greedy tokens, and its logprobs bit for bit, do not depend on what else is in the step, on how
its prompt was chunked, or on whether its prefix came from the cache.

SPEC promises the same text for the same greedy request whatever else is in the batch, and by
default the engine only comes close. A token's row meets kernels whose summation order
depends on how many rows came with it: PyTorch's GEMMs pick their blocking by the row count
(oneDNN's bf16 AMX kernels round visibly differently for 1, 7 or 512 rows), lesson 15's fast
path sends up to 16 rows to the GEMV kernel and more to oneDNN/MKL, a prefill chunk's
attention is a matmul over the chunk while a decode row goes through the numba kernel, and a
decode step of up to 16 rows runs fused with float32 activations where a bigger one rounds
them to bf16 between modules. Each is a rounding difference; a near-tie in the logits turns
it into another token, and greedy text then drifts apart (a prompt prefilled whole and the
same prompt served from a cached prefix plus a suffix chunk, on an AMX Xeon in bf16).

This mode gives every row one computation of its own, fixed by the row alone:

- every linear layer and the LM head runs :func:`~nanoengine.model.layers.cpu_gemv.matmul_rows`
  for every row count, prefill included (:class:`GemvLinearMethod` with ``max_rows=None``):
  each output is one dot product in an order fixed by the input size;
- attention runs every query row through lesson 15's decode kernel
  (:func:`~nanoengine.attention.numba_cpu.batch_invariant_attention`);
- no oneDNN prepacking and no fused decode step (the loader leaves both out);
- the rest of the step is per row already, and the tests hold it to that: elementwise ops
  (residual adds, rotary, SiLU), RMSNorm and log-softmax reduce each row over its own last
  dimension, the embedding is a gather, the sampler takes each row's argmax.

What it costs (docs/benchmarks.md, "Batch-invariant mode"): decode gives up the fused step
(about half the tokens/s on SmolLM2); prefill gives up the GEMMs that use the cores' full
arithmetic (float32: MKL's; bf16 on AMX: oneDNN's), and each query row reads its keys itself.

Covered: float32 or bfloat16, plain weights or lesson 11's int8, on one CPU rank, on
pipeline stages (they pass rows on unchanged) or on two tensor-parallel ranks (their
all-reduce adds two partial sums: one addition, the same either way round).
:func:`use_batch_invariant_kernels` refuses what the kernels cannot make invariant (a GPU,
float16, other quantized weights, experts, sliding windows, an all-reduce over more ranks,
whose order of additions gloo chooses by the tensor's size); ``LLM`` refuses LoRA adapters,
whose per-adapter matmuls gather a varying number of rows.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoengine.model.layers.cpu_gemv import GemvLinearMethod, gemv_supported, warm_up, wrappable
from nanoengine.model.layers.moe import FusedMoE


def uncovered(model: nn.Module) -> list[str]:
    """What in ``model`` the mode cannot make invariant, one line each (empty: all of it):
    a linear layer whose weight the per-row kernel cannot read, or whose partial sums are
    all-reduced over more than two ranks; experts; a sliding window."""
    found = []
    for name, module in model.named_modules():
        method = getattr(module, "linear_method", None)
        stored = getattr(module, "qweight", getattr(module, "weight", None))
        if method is not None and not (wrappable(method) and stored is not None and gemv_supported(stored.dtype)):
            found.append(f"{name} ({type(method).__name__}"
                         f"{f', {stored.dtype}' if isinstance(stored, torch.Tensor) else ''})")
        elif method is not None and getattr(module, "split", None) == "input" and module.tp.size > 2:
            found.append(f"{name} (an all-reduce over {module.tp.size} tensor-parallel ranks)")
        elif isinstance(module, FusedMoE):
            found.append(f"{name} (mixture of experts)")
        elif getattr(module, "sliding_window", None) is not None:
            found.append(f"{name} (sliding-window attention)")
    return found


# What the per-row kernels read: the weights (int8 codes aside) and, in the model's dtype, the KV cache.
DTYPES = (torch.float32, torch.bfloat16)


def use_batch_invariant_kernels(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Put every linear layer of a loaded ``model`` (and its head) on the per-row kernel for
    all row counts; returns how many. Raises ValueError, naming them, where parts of the model
    cannot run invariantly. Call after loading, instead of the fast path's packing and fusing.
    """
    if device.type != "cpu":
        raise ValueError("batch_invariant=True runs on the CPU only: its kernels are numba CPU kernels")
    if dtype not in DTYPES:
        raise ValueError(f"batch_invariant=True runs float32 or bfloat16 models, not {dtype}")
    missing = uncovered(model)
    if missing:
        shown = "; ".join(missing[:3]) + (f"; and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"batch_invariant=True cannot make every row's arithmetic independent of the batch in this "
                         f"model: {shown}. It covers float32 or bfloat16 weights, or int8 (-q int8), of dense models "
                         "with full attention, on at most two tensor-parallel ranks")
    warm_up()
    wrapped = 0
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            module.linear_method = GemvLinearMethod(method, max_rows=None)
            wrapped += 1
    return wrapped
