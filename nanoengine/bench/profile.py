"""``--profile PATH`` of ``bench latency`` and ``bench throughput`` (lesson 15): where the
measured runs' wall time went, by category, in all and per engine step.

The measured runs go under ``torch.profiler`` (CPU ops, no shapes); the Chrome trace is
written to PATH (open it in Perfetto or chrome://tracing) and a table is printed. Each op's
*self* time (its time minus its children's) is counted once, in the category of its name, so
the categories never count a nested op twice (``aten::linear`` holds ``aten::addmm``: linear
keeps only its own dispatch). A ``record_function`` range is an event too and keeps its self
time the same way: a ``nanoengine.*`` range (a kernel of our own run from Python, say
``nanoengine.gemv``) counts in the category its name matches, and one that matches nothing
(``nanoengine.step``, around each engine step) is left to Python/other, which is the wall
time that no categorized op accounts for: Python, the scheduler, output handling.

Limits: names decide, so a plain-PyTorch attention's ``softmax`` counts as sampling and its
``bmm`` as matmul (the fast path's numba kernels are named by
``nanoengine.profiling.profiled``: ``nanoengine.attention``, ``nanoengine.gemv``,
``nanoengine.fused_decode``, lesson 17's ``nanoengine.rms_norm``; a kernel called with no
such range is Python/other); the profiler's own bookkeeping inflates every figure a little;
only this process is seen (tensor/pipeline-parallel ranks in other processes are not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STEP_RANGE = "nanoengine.step"  # the range a bench puts around each engine step it drives
DECODE_STEP_RANGE = "nanoengine.step.decode"  # ... one in which every request is past its prefill
OTHER = "Python/other"


# (category, exact names, substrings), matched against the lower-cased event name in this
# order: the first rule that takes a name wins; what none takes is left to Python/other.
CATEGORY_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("fused", (), ("fused_decode",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int8pack_mm", "aten::_int_mm"),
     ("linear", "gemv", "gemm")),
    ("attention", (), ("attention", "sdpa")),
    ("kv write", ("aten::index_copy_", "aten::index_put_"), ("write_kv", "kv_write")),
    ("sampling", (), ("sample", "softmax", "argmax", "topk", "multinomial", "sort")),
    ("elementwise", (), ("aten::", "rms_norm")),
)
"""Why each category: **fused** is lesson 15's whole decoder stack in one compiled
call (its matmuls, attention and small operations together: it exists to remove the
dispatch between them, so the profiler cannot split it); **matmul** is the weights' products, a decode step's bulk of bytes and
the roofline's subject (what lesson 11's formats shrink and lesson 15's prepacking speeds);
**attention** reads the KV cache, the one cost that grows with the sequence; **kv write**
stores the step's keys and values into their slots (``slot_mapping``); **sampling** turns
logits into tokens, a cost per step that no weight format shrinks; **elementwise** is every
other tensor op (norms, activations, rotary, copies), many small ops whose dispatch adds up;
**Python/other** is the rest of the wall time, what the engine spends outside ops."""
CATEGORIES = (*(category for category, _, _ in CATEGORY_RULES), OTHER)


def category_of(name: str) -> str | None:
    """The category of an event's name; None for one no rule takes (a range such as
    ``nanoengine.step``, an op outside ``aten``), whose self time is left to Python/other."""
    lowered = name.lower()
    return next((category for category, names, parts in CATEGORY_RULES
                 if lowered in names or any(part in lowered for part in parts)), None)


@dataclasses.dataclass(slots=True)
class ProfileRow:
    """One category's share of the profiled wall time; ``ms_per_step`` is None when the number
    of engine steps is unknown (``--backend hf``)."""

    category: str
    ms: float
    percent: float
    ms_per_step: float | None


def _name_and_seconds(event: Any) -> tuple[str, float]:
    """``(name, self seconds)`` of a profiler ``FunctionEvent`` (its self time is in µs) or of a pair."""
    if isinstance(event, tuple):
        return event
    return event.name, event.self_cpu_time_total / 1e6


def categorize(events: Iterable[Any], wall_s: float, steps: int | None) -> list[ProfileRow]:
    """The wall time ``wall_s`` split by :data:`CATEGORIES`, from the self time of every event
    (profiler events or ``(name, seconds)`` pairs). The rows sum to ``wall_s``: Python/other is
    whatever the categorized ops leave (negative only if ops ran on other threads meanwhile)."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        name, self_s = _name_and_seconds(event)
        category = category_of(name)
        if category is not None:
            seconds[category] += self_s
    seconds[OTHER] = wall_s - sum(seconds[c] for c in CATEGORIES[:-1])
    return [ProfileRow(c, s * 1e3, 100 * s / wall_s if wall_s else 0.0, s * 1e3 / steps if steps else None)
            for c, s in seconds.items()]


def _within(events: list[Any], ranges: list[Any]) -> list[Any]:
    """The events that start inside one of ``ranges`` (profiler events, which do not overlap),
    other than the ranges themselves."""
    import bisect

    spans = sorted((r.time_range.start, r.time_range.end) for r in ranges)
    starts = [start for start, _ in spans]
    inside = []
    for event in events:
        if event.name in (STEP_RANGE, DECODE_STEP_RANGE):
            continue
        i = bisect.bisect_right(starts, event.time_range.start) - 1
        if i >= 0 and event.time_range.start < spans[i][1]:
            inside.append(event)
    return inside


def decode_step_rows(events: list[Any]) -> list[ProfileRow] | None:
    """:func:`categorize` over the decode steps alone (the ``nanoengine.step.decode`` ranges), so
    a prefill's big matmuls and small ops do not hide what a decode step costs; None when no
    step was marked as one."""
    ranges = [e for e in events if e.name == DECODE_STEP_RANGE]
    if not ranges:
        return None
    wall_s = sum(r.time_range.end - r.time_range.start for r in ranges) / 1e6
    return categorize(_within(events, ranges), wall_s, len(ranges))


def format_profile(rows: list[ProfileRow]) -> str:
    """The rows as an aligned table, with their total."""
    per_step = [r.ms_per_step for r in rows]
    total = ProfileRow("total", sum(r.ms for r in rows), sum(r.percent for r in rows),
                       None if None in per_step else sum(per_step))
    cells = [("category", "ms", "%", "ms/step")] + [
        (r.category, f"{r.ms:.2f}", f"{r.percent:.1f}%", "-" if r.ms_per_step is None else f"{r.ms_per_step:.3f}")
        for r in [*rows, total]]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}"
                     for a, b, c, d in cells)


class BenchProfiler:
    """Profiles a bench's measured runs when given a trace path, and does nothing otherwise,
    so a bench wraps its runs the same way either way and an unprofiled run times no range.
    Use: ``with profiler:`` around the runs, :meth:`step_range` around each engine step the
    bench drives, then :meth:`report`."""

    def __init__(self, trace_path: Path | None) -> None:
        self.trace_path = trace_path
        self._prof = None
        self._started = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> BenchProfiler:
        if self.trace_path is not None:
            from torch.profiler import ProfilerActivity, profile  # torch: loaded only when a bench runs

            self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self._prof.__enter__()
            self._started = time.perf_counter()  # after the profiler's start, which takes a while
        return self

    def __exit__(self, *exc: object) -> None:
        if self._prof is not None:
            self.wall_s = time.perf_counter() - self._started
            self._prof.__exit__(*exc)

    def step_range(self, decode: bool = False) -> contextlib.AbstractContextManager:
        """A ``nanoengine.step`` range when profiling, so the trace shows each step and the
        table counts them; ``decode``: every request of the step is past its prefill (such steps
        get a table of their own)."""
        if self._prof is None:
            return contextlib.nullcontext()
        from torch.profiler import record_function

        return record_function(DECODE_STEP_RANGE if decode else STEP_RANGE)

    def report(self, steps: int | None = None) -> dict[str, Any] | None:
        """Write the trace, print the table and return it for ``--result-json`` (None when not
        profiling). ``steps``: the engine steps profiled; by default the ``nanoengine.step``
        ranges counted (none: no per-step column)."""
        if self._prof is None:
            return None
        events = self._prof.events()
        if steps is None:
            steps = sum(e.name in (STEP_RANGE, DECODE_STEP_RANGE) for e in events) or None
        rows = categorize(events, self.wall_s, steps)
        decode_rows = decode_step_rows(events)
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.trace_path))
        print(f"profile of the measured runs (their timings above include the profiler's cost): "
              f"{self.wall_s * 1e3:.1f} ms wall, {steps or 'unknown'} engine steps, trace {self.trace_path}")
        print(format_profile(rows))
        record = {"trace": str(self.trace_path), "wall_ms": self.wall_s * 1e3, "steps": steps,
                  "categories": [dataclasses.asdict(r) for r in rows]}
        if decode_rows is not None:
            print("the decode steps alone (every request past its prefill; the wall time inside their ranges):")
            print(format_profile(decode_rows))
            record["decode_steps"] = [dataclasses.asdict(r) for r in decode_rows]
        return record


def profile_decode_steps(engine: Any, prompts: list[list[int]], steps: int, trace_path: Path) -> dict[str, Any]:
    """Where ``steps`` decode steps of ``engine`` (an ``LLMEngine``) go, by category (lesson 17's
    waterfall): :meth:`BenchProfiler.report` of those steps alone, the batch being ``prompts``.
    The prompts are prefilled in one step, and one decode step is taken, before the profiler
    starts, so neither the prefill nor a kernel's first compilation is in the table; every
    request then decodes through all ``steps`` and finishes with the last."""
    from nanoengine.engine.inputs import Prompt  # the engine: loaded only when profiling
    from nanoengine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{i}", Prompt(None, prompt), params)
    if len(engine.step()) < len(prompts):
        raise ValueError("the prompts must prefill in one step: fewer or shorter prompts, or a larger "
                         "max_num_batched_tokens")
    engine.step()
    profiler = BenchProfiler(trace_path)
    with profiler:
        for _ in range(steps):
            with profiler.step_range(decode=True):
                engine.step()
    return profiler.report(steps)
