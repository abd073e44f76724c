"""``--profile``: the table of where a bench's wall time went, from op names and self times
alone (no model), and ``bench latency --profile`` end to end on a tiny model."""

from __future__ import annotations

import json
import re

import pytest

from nanoengine import cli
from nanoengine.bench.profile import (
    CATEGORIES, DECODE_STEP_RANGE, OTHER, STEP_RANGE, categorize, category_of, decode_step_rows, format_profile,
)

pytestmark = pytest.mark.l15


@pytest.mark.parametrize("name, category", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::matmul", "matmul"),
    ("aten::linear", "matmul"), ("mkldnn::_linear_pointwise", "matmul"), ("aten::_weight_int8pack_mm", "matmul"),
    ("aten::_int_mm", "matmul"), ("nanoengine::gemv", "matmul"), ("nanoengine.gemv.int4", "matmul"),
    ("MyKernels::GEMM_int8", "matmul"),  # names are matched in lower case
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("nanoengine.attention", "attention"),
    ("my::sdpa", "attention"),
    ("aten::index_copy_", "kv write"), ("aten::index_put_", "kv write"), ("nanoengine.write_kv", "kv write"),
    ("aten::argmax", "sampling"), ("aten::_softmax", "sampling"), ("aten::_log_softmax", "sampling"),
    ("aten::topk", "sampling"), ("aten::multinomial", "sampling"), ("aten::sort", "sampling"),
    ("nanoengine.sample", "sampling"), ("nanoengine.fused_decode", "fused"),
    ("aten::mul", "elementwise"), ("aten::silu", "elementwise"), ("aten::copy_", "elementwise"),
    ("aten::index", "elementwise"), ("aten::cat", "elementwise"),
    (STEP_RANGE, None), (DECODE_STEP_RANGE, None), ("c10d::allreduce_", None),  # left to Python/other
])
def test_each_name_falls_in_its_category(name, category):
    assert category_of(name) == category


def test_categories_sum_to_the_wall_time_and_other_is_what_ops_leave():
    events = [
        ("aten::linear", 0.001), ("aten::addmm", 0.010), ("nanoengine.gemv", 0.004),  # matmul 15 ms
        ("nanoengine.attention", 0.006),  # a range: its self time, not its children's
        ("aten::index_copy_", 0.002),
        ("aten::argmax", 0.0005), ("aten::sort", 0.0015),  # sampling 2 ms
        ("aten::mul", 0.003), ("aten::rms_norm", 0.001), ("aten::mul", 0.001),  # elementwise 5 ms
        (STEP_RANGE, 0.007),  # the step's own Python: not an op, so in Python/other
        ("nanoengine.fused_decode", 0.004),  # lesson 15's fused decoder stack
    ]
    rows = categorize(events, wall_s=0.050, steps=5)
    assert [r.category for r in rows] == list(CATEGORIES) and CATEGORIES[-1] == OTHER
    ms = {r.category: r.ms for r in rows}
    assert ms == pytest.approx({"fused": 4.0, "matmul": 15.0, "attention": 6.0, "kv write": 2.0,
                                "sampling": 2.0, "elementwise": 5.0, OTHER: 50.0 - 34.0})
    assert sum(r.ms for r in rows) == pytest.approx(50.0) and sum(r.percent for r in rows) == pytest.approx(100.0)
    assert {r.category: r.percent for r in rows}["matmul"] == pytest.approx(30.0)
    assert {r.category: r.ms_per_step for r in rows}[OTHER] == pytest.approx(16.0 / 5)
    assert all(r.ms_per_step is None for r in categorize(events, 0.050, steps=None))


def test_nested_profiler_events_are_counted_once():
    """Self times of a real profile: a range and the ops under it (linear holds matmul holds mm)
    add up to the range's own total, so nothing is counted twice and nothing is lost."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(8, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        with record_function("nanoengine.attention"):
            torch.nn.functional.linear(x, x).softmax(-1).mul(2)
    events = prof.events()
    (outer,) = [e for e in events if e.name == "nanoengine.attention"]
    ms = {r.category: r.ms for r in categorize(events, outer.cpu_time_total / 1e6, steps=1)}
    assert ms[OTHER] == pytest.approx(0.0, abs=1e-6)
    assert all(ms[c] > 0 for c in ("matmul", "attention", "sampling", "elementwise"))


class _Event:
    """A profiler event as ``decode_step_rows`` reads one: name, start and end (µs), self time (µs)."""

    def __init__(self, name: str, start: float, end: float, self_us: float) -> None:
        self.name, self.self_cpu_time_total = name, self_us
        self.time_range = type("Range", (), {"start": start, "end": end})()


def test_the_decode_steps_table_counts_only_what_ran_inside_decode_steps():
    events = [
        _Event(STEP_RANGE, 0, 1000, 100), _Event("aten::mm", 10, 900, 800),  # the prefill step: left out
        _Event(DECODE_STEP_RANGE, 1000, 1100, 30), _Event("nanoengine.fused_decode", 1010, 1080, 70),
        _Event("aten::mm", 1100, 1150, 50),  # between the steps: left out
        _Event(DECODE_STEP_RANGE, 1200, 1300, 20), _Event("nanoengine.fused_decode", 1205, 1275, 70),
        _Event("aten::argmax", 1280, 1290, 10),
    ]
    ms = {r.category: r.ms for r in decode_step_rows(events)}
    assert ms["fused"] == pytest.approx(0.140) and ms["sampling"] == pytest.approx(0.010)
    assert ms["matmul"] == 0 and ms[OTHER] == pytest.approx(0.200 - 0.150)
    assert {r.category: r.ms_per_step for r in decode_step_rows(events)}[OTHER] == pytest.approx(0.025)
    assert decode_step_rows(events[:2]) is None


def test_the_table_has_a_row_per_category_and_the_total():
    table = format_profile(categorize([("aten::mm", 0.003)], wall_s=0.004, steps=2))
    lines = table.splitlines()
    assert lines[0].split() == ["category", "ms", "%", "ms/step"]
    assert [line.rsplit(None, 3)[0] for line in lines[1:]] == [*CATEGORIES, "total"]
    matmul = lines[1 + CATEGORIES.index("matmul")]
    assert matmul.split()[1:] == ["3.00", "75.0%", "1.500"] and lines[-1].split()[1:] == ["4.00", "100.0%", "2.000"]
    assert len({len(line) for line in lines}) == 1, "aligned"
    assert format_profile(categorize([], 0.004, None)).splitlines()[-1].split()[-1] == "-"


def test_bench_latency_profiles_the_timed_runs(zoo_paths, tmp_path, capsys):
    tiny_model = zoo_paths["llama-gqa"]
    trace, out = tmp_path / "tmp" / "trace.json", tmp_path / "latency.json"
    assert cli.main(["bench", "latency", str(tiny_model), "--engine", "llm", "--batch-size", "2", "--input-len", "6",
                     "--output-len", "5", "--num-iters", "1", "--num-iters-warmup", "0", "--dtype", "float32",
                     "--no-fast-path", "--profile", str(trace), "--result-json", str(out)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == STEP_RANGE for e in events) == 1, "the prefill step's range"
    assert sum(e.get("name") == DECODE_STEP_RANGE for e in events) == 4, "then 4 decode steps"
    printed = capsys.readouterr().out
    for category in CATEGORIES:
        assert re.search(rf"^{re.escape(category)} +\d+\.\d\d +-?\d+\.\d% +-?\d+\.\d{{3}}$", printed, re.M), category
    profile = json.loads(out.read_text())["profile"]
    assert profile["steps"] == 5 and profile["trace"] == str(trace)
    rows = profile["categories"]
    assert [r["category"] for r in rows] == list(CATEGORIES)
    assert sum(r["ms"] for r in rows) == pytest.approx(profile["wall_ms"])
    assert {r["category"]: r["ms"] for r in rows}[OTHER] >= 0, "no op counted twice (self times only)"
    assert {r["category"]: r["ms"] for r in rows}["matmul"] > 0, "the model's projections ran under the profiler"
    assert "the decode steps alone" in printed
    decode = profile["decode_steps"]
    assert [r["category"] for r in decode] == list(CATEGORIES)
    decode_wall = sum(e["dur"] for e in events if e.get("name") == DECODE_STEP_RANGE) / 1e3
    assert sum(r["ms"] for r in decode) == pytest.approx(decode_wall, rel=1e-3)
    assert all(r["ms_per_step"] == pytest.approx(r["ms"] / 4) for r in decode)
