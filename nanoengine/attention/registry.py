"""Which paged-attention implementation runs where: one line per backend.

Every backend has the reference's signature, ``(q, k_cache, v_cache, metadata, scale) ->
out``, and is tested against ``torch_paged.paged_attention``. Modules are imported only when
a backend is asked for, so importing nanoengine never imports numba.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

# backend name -> (module under nanoengine.attention, function)
_BACKENDS = {
    "torch": ("torch_paged", "paged_attention"),
    "torch_batched": ("torch_batched", "paged_attention"),
    "numba_cuda": ("numba_cuda", "paged_attention"),
    "numba_cpu": ("numba_cpu", "paged_attention"),
}

AttentionFn = Callable[..., torch.Tensor]


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def default_backend(device: torch.device, fast_path: bool = False) -> str:
    """The numba.cuda kernel on a GPU. On a CPU the batched PyTorch path (the CUDA simulator
    runs Python per thread: right for tests, far too slow to serve), or with the fast path
    (lesson 15) the numba CPU kernel."""
    if device.type == "cuda":
        return "numba_cuda"
    return "numba_cpu" if fast_path else "torch_batched"


def get_attention_backend(name: str) -> AttentionFn:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(backend_names())}")
    module_name, function = _BACKENDS[name]
    return getattr(importlib.import_module(f"nanoengine.attention.{module_name}"), function)
