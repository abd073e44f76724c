"""Names for work that torch.profiler cannot see on its own.

A numba kernel is not a PyTorch operator, so a profile of a step would file its time under
"Python/other". Wrapping the call in ``profiled("nanoengine.attention")`` gives it a named
range in the trace, which ``nanoengine bench --profile`` sorts into its category. A range
costs ~17 µs even with no profiler running, more than a small kernel, so it is opened only
while a profiler records (checking costs ~0.3 µs).
"""

from __future__ import annotations

import contextlib

import torch

_NOTHING = contextlib.nullcontext()  # reusable and reentrant


def profiled(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function`` range called ``name`` while torch.profiler records; else nothing."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _NOTHING
