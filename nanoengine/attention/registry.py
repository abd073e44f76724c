"""Which paged-attention implementation runs where: one line per backend.

Every backend has the reference's signature, ``(q, k_cache, v_cache, metadata, scale) ->
out``, and is tested against ``torch_paged.paged_attention``. Modules are imported only when
a backend is asked for, so importing nanoengine never imports numba.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("nanoengine")

# backend name -> (module under nanoengine.attention, function)
_BACKENDS = {
    "torch": ("torch_paged", "paged_attention"),
    "torch_batched": ("torch_batched", "paged_attention"),
    "numba_cuda": ("numba_cuda", "paged_attention"),
    "numba_cpu": ("numba_cpu", "paged_attention"),
    "numba_cpu_batch_invariant": ("numba_cpu", "batch_invariant_attention"),
}

AttentionFn = Callable[..., torch.Tensor]


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def default_backend(device: torch.device, fast_path: bool = False, batch_invariant: bool = False) -> str:
    """The numba.cuda kernel on a GPU. On a CPU the batched PyTorch path (the CUDA simulator
    runs Python per thread: right for tests, far too slow to serve), or with the fast path
    (lesson 15) the numba CPU kernel; in batch-invariant mode (a CPU mode) that kernel for
    every query row, prefill ones included."""
    if batch_invariant:
        return "numba_cpu_batch_invariant"
    if device.type == "cuda":
        return "numba_cuda"
    return "numba_cpu" if fast_path else "torch_batched"


def get_attention_backend(name: str) -> AttentionFn:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(backend_names())}")
    module_name, function = _BACKENDS[name]
    return getattr(importlib.import_module(f"nanoengine.attention.{module_name}"), function)


def load_backend(name: str, dtype: torch.dtype, fallback: str | None = "torch_batched") -> AttentionFn:
    """``name``'s attention function, warmed up for ``dtype`` where its module has a
    ``warm_up`` (a kernel compiled and run once, so the first step does not pay for it).

    In a student copy where the kernel's task is not written yet, the warm-up raises its
    NotImplementedError: the engine then runs ``fallback`` (a reference path), with a warning
    naming the task, so everything before that lesson keeps working. ``fallback=None``: no
    substitute will do (batch-invariant mode), and the NotImplementedError propagates.
    """
    attention = get_attention_backend(name)
    warm_up = getattr(importlib.import_module(attention.__module__), "warm_up", None)
    if warm_up is None:
        return attention
    try:
        warm_up(dtype)
    except NotImplementedError as todo:
        if fallback is None:
            raise
        logger.warning("attention backend %r is not written yet (%s); running %r instead", name, todo, fallback)
        return get_attention_backend(fallback)
    return attention
