"""numba's on-disk cache for a function that compiles in numba functions of other files.

numba keys a cached function by its own source file only. The fused decode step (lesson 15)
compiles into itself the kernels it calls, from other files (the attention kernel is lesson
15's task L15.T1): cached that way, it would go on running a kernel the learner has since
changed. So such a function names the files it depends on, and its cache entry is keyed by
all of them: changing any one recompiles it. (Without a cache it recompiles in every
process: ~10 s for SmolLM2's fused step on an AMD EPYC Zen 1, before the first token.)

Code that calls a C kernel through ctypes would hold that process's function address, which
numba refuses to cache; ``quant/native.py`` hands numba the C kernels by symbol name instead,
so the fused step caches with them too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from numba.core.caching import CacheImpl, InTreeCacheLocator

# a function's code object -> (the other files it compiles in, what else decides what it compiles in)
_DEPENDENCIES: dict[object, tuple[tuple[str, ...], Callable[[], str]]] = {}


class _DependentSourcesLocator(InTreeCacheLocator):
    """numba's in-tree cache (``__pycache__`` beside the source), stamped with the contents of
    the function's file and of every file it depends on."""

    def get_source_stamp(self) -> bytes:
        paths, salt = _DEPENDENCIES[self._code]
        digest = hashlib.sha256(super().get_source_stamp())
        for path in paths:
            digest.update(Path(path).read_bytes())
        digest.update(salt().encode())
        return digest.digest()

    @classmethod
    def from_function(cls, py_func: Callable, py_file: str) -> _DependentSourcesLocator | None:
        if py_func.__code__ not in _DEPENDENCIES:
            return None
        self = super().from_function(py_func, py_file)
        if self is not None:
            self._code = py_func.__code__
        return self


if _DependentSourcesLocator not in CacheImpl._locator_classes:
    CacheImpl._locator_classes.insert(0, _DependentSourcesLocator)


def cached_with(*modules: object, salt: Callable[[], str] = str) -> Callable[[Callable], Callable]:
    """Mark a Python function, before ``numba.njit(cache=True)`` wraps it, as compiling in the
    numba functions of ``modules``: its cache entry then depends on their source files too,
    and on ``salt()`` (e.g. which of two kernels those modules chose in this process)."""

    def mark(py_func: Callable) -> Callable:
        _DEPENDENCIES[py_func.__code__] = (tuple(os.path.abspath(m.__file__) for m in modules), salt)
        return py_func

    return mark
