"""Lesson 15: the kernels written in C, compiled on this machine the first time they are used.

The decode kernels of ``gemv_kernels.c`` need vector instructions that numba does not emit
(nibble unpacking, short per-group loops, int8 x int8 dot products), so they are C with AVX2
intrinsics (and plain loops where AVX2 is missing). It is compiled with the system's C compiler for the CPU it runs on
(``-march=native``) into the cache folder, keyed by the source and the CPU's flags, so later
starts load it in milliseconds. numba-compiled code calls its functions by name, as external
symbols of this process (the library is loaded into LLVM's symbol table), not through ctypes:
a ctypes function is an address in this process, which numba cannot cache to disk, while a
named symbol is resolved again when cached code is loaded (the fused decode step is cached).

No compiler, or a failed build, is not an error: :func:`library` returns None and the numba
kernels of ``grouped_gemv`` run instead (slower, same results up to rounding).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import llvmlite.binding
from numba import types as nb

from nanoengine.logger import init_logger
from nanoengine.model.tokenizer_cache import cache_root

logger = init_logger()

SOURCE = Path(__file__).with_name("gemv_kernels.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler flags and CPU, built if not cached."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), _cpu_flags()]).encode()).hexdigest()[:20]
    target = cache_root() / "native" / f"gemv_kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", staging, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(staging, target)  # atomic: another process never loads half a file
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


_POINTER, _SIZE = nb.uintp, nb.int64
_SIGNATURES = {
    # (x, xscale or NULL, xsum, rows, k, codes, scales, mins, group_size, n_first, n_last, out, n_total)
    "int4_rows": nb.void(*[_POINTER] * 3, _SIZE, _SIZE, *[_POINTER] * 3, _SIZE, _SIZE, _SIZE, _POINTER, _SIZE),
    "int8_grouped_rows": nb.void(*[_POINTER] * 3, _SIZE, _SIZE, *[_POINTER] * 3, _SIZE, _SIZE, _SIZE, _POINTER, _SIZE),
    # (x codes, x scales, rows, k, w codes, w scales, n_first, n_last, out, n_total)
    "int8_int8_rows": nb.void(_POINTER, _POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE, _SIZE, _POINTER, _SIZE),
}


@functools.cache
def library() -> types.SimpleNamespace | None:
    """``gemv_kernels.c`` built and loaded, each of its functions as a numba external function
    of the same name (callable from numba-compiled code only), or None when it cannot be built
    here (``NANOENGINE_NO_NATIVE=1`` also says None, to run the fallback)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("NANOENGINE_NO_NATIVE") or compiler is None:
        return None
    try:
        llvmlite.binding.load_library_permanently(str(_build(compiler)))
    except (RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("the C decode kernels could not be built (%s); using the fallbacks", detail)
        return None
    return types.SimpleNamespace(**{name: nb.ExternalFunction(name, signature)
                                    for name, signature in _SIGNATURES.items()})
