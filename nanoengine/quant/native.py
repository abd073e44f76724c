"""Lesson 15: the kernels written in C, compiled on this machine the first time they are used.

The decode kernels of ``gemv_kernels.c`` need vector instructions that numba does not emit
(nibble unpacking, short per-group loops, int8 x int8 dot products), so they are C with AVX2
intrinsics (and plain loops where AVX2 is missing). It is compiled with the system's C compiler for the CPU it runs on
(``-march=native``) into the cache folder, keyed by the source and the CPU's flags, so later
starts load it in milliseconds; numba-compiled code calls it through ``ctypes``.

No compiler, or a failed build, is not an error: :func:`library` returns None and the numba
kernels of ``grouped_gemv`` run instead (slower, same results up to rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

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


@functools.cache
def library() -> ctypes.CDLL | None:
    """``gemv_kernels.c`` built and loaded, its functions typed for ctypes (numba calls them as
    such), or None when it cannot be built here (``NANOENGINE_NO_NATIVE=1`` also says None,
    to run the fallback)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("NANOENGINE_NO_NATIVE") or compiler is None:
        return None
    try:
        loaded = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("the C decode kernels could not be built (%s); using the fallbacks", detail)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    # (x, xscale or NULL, xsum, rows, k, codes, scales, mins, group_size, n_first, n_last, out, n_total)
    for function in (loaded.int4_rows, loaded.int8_grouped_rows):
        function.argtypes = [pointer, pointer, pointer, size, size, pointer, pointer, pointer, size, size, size,
                             pointer, size]
        function.restype = None
    # (x codes, x scales, rows, k, w codes, w scales, n_first, n_last, out, n_total)
    loaded.int8_int8_rows.argtypes = [pointer, pointer, size, size, pointer, pointer, size, size, pointer, size]
    loaded.int8_int8_rows.restype = None
    return loaded
