"""What the hardware offers: the device to run on and the dtype it computes fastest.

``dtype="auto"`` means bfloat16 where the hardware has native bf16 arithmetic (most GPUs;
CPUs with AVX-512 BF16 or AMX), float32 elsewhere, because emulated bf16 is slower than
float32 and loses precision for nothing.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda"`` into a device, refusing a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but PyTorch sees no CUDA GPU")
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises bf16 instructions (``avx512_bf16`` or ``amx_bf16``)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_int8_matmul(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU multiplies int8 matrices natively (VNNI or AMX), where oneDNN makes
    ``torch._int_mm`` fast; without them PyTorch's int8 matmul is a slow reference loop."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name ``ModelConfig(dtype=...)``, logs and
    benchmark records use."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``"auto"`` picks bf16 only where it is native."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for the KV cache now: free GPU memory, or the OS's MemAvailable on a CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory; pass kv_cache_memory_bytes")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit


def keep_freed_memory_for_reuse() -> bool:
    """Tell glibc to serve PyTorch's activation buffers from the heap and to keep freed memory.

    PyTorch's CPU allocator asks ``malloc`` for every tensor. glibc hands out blocks above its
    mmap threshold (128 KiB at start) as fresh pages from the kernel and returns them on
    ``free``, so each multi-megabyte activation of a prefill step page-faults its way in again,
    and elementwise operations run at a fraction of their speed. glibc raises the threshold by
    itself only after a large block is freed, which the reference path happens to do on every
    bf16 matmul (oneDNN's weight reorder buffer) and the fast path, with prepacked weights,
    never does. Raising the thresholds once gives the fast path the warm heap for good.
    Returns False where there is no glibc (the engine works the same, only slower).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
