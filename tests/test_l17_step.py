"""Lesson 17: RMSNorm fused with the residual add equals the two steps it replaces, and the
persistent input batch gives the step lesson 06's inputs.

- ``rms_norm_residual`` against the unfused PyTorch path (``RMSNorm.add_norm`` with no
  kernel) on random shapes, scales and dtypes: the new residual bit for bit, the normed rows
  within float32's or bf16's rounding, written in place where its contract says;
- a tiny model's greedy tokens (the sequence recomputed at each step) are the same with the
  norms fused and unfused;
- the fast path's loader fuses the norms, the reference path does not, a student copy without
  the kernel falls back, and the profile files the kernel under elementwise work;
- the persistent batch's ids, positions, slots and block tables equal lesson 06's flattening
  over random scheduler traffic, as rows shrink, change and are reused;
- an engine with the fused decode step warms it up at start, at vLLM's bucket sizes, and
  says how long it took.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.attention.dense import NoCache
from nanoengine.attention.metadata import build_attention_metadata
from nanoengine.bench.profile import CATEGORIES, categorize, category_of
from nanoengine.config import ModelConfig
from nanoengine.model import load_model
from nanoengine.model.layers import fused_norm
from nanoengine.model.layers.fused_norm import rms_norm_residual, use_fused_norms
from nanoengine.model.layers.norm import RMSNorm
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler.output import ScheduledRequest
from nanoengine.viz import step_waterfall
from nanoengine.worker.input_batch import InputBatch
from nanoengine.worker.model_runner import decode_buckets
from tests.traffic import ARRIVALS, scheduler_traffic

pytestmark = pytest.mark.l17

# normed rows: float32 differs in the order of additions only; bf16 rounds once where the
# unfused path rounds twice (before and after the weight)
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _norm(hidden: int, dtype: torch.dtype, eps: float, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype)
    norm.weight.data = torch.randn(hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return norm


@pytest.mark.l17_t1
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@given(
    leading=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    hidden=st.integers(1, 200),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_residual_equals_the_unfused_add_and_norm(dtype, leading, hidden, scale, eps, seed):
    generator = torch.Generator().manual_seed(seed)
    x, residual = ((torch.randn(*leading, hidden, generator=generator) * scale).to(dtype) for _ in "xr")
    norm = _norm(hidden, dtype, eps, seed)
    expected_normed, expected_residual = norm.add_norm(x.clone(), residual.clone())
    residual_before = residual.clone()
    normed, new_residual = rms_norm_residual(x, residual, norm.weight, eps)
    assert normed.dtype == new_residual.dtype == dtype and normed.shape == new_residual.shape == x.shape
    assert torch.equal(new_residual, expected_residual), "the new residual must be x + residual, rounded once"
    assert new_residual.data_ptr() == x.data_ptr(), "the sum is written over x"
    assert torch.equal(residual, residual_before), "residual is only read"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(normed.float(), expected_normed.float(), rtol=tol, atol=tol)


def _greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step (no cache, no engine: this
    task's tests reach no other task's code)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), NoCache())
            ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt):]


@pytest.mark.l17_t1
def test_a_tiny_models_greedy_tokens_are_the_same_with_the_norms_fused(zoo_paths):
    model = load_model(ModelConfig(model=str(zoo_paths["llama-gqa"]), dtype="float32")).model
    norms = [m for m in model.modules() if type(m) is RMSNorm]
    prompts = [[(7 * i + j) % 300 + 3 for j in range(3 + 9 * i)] for i in range(3)]
    unfused = [_greedy(model, prompt, 8) for prompt in prompts]
    for norm in norms:
        norm.add_kernel = rms_norm_residual
    assert [_greedy(model, prompt, 8) for prompt in prompts] == unfused


def _eager_fast_engine(path: str) -> LLM:
    """The fast path module by module (no fused decode step)."""
    return LLM(path, dtype="float32", fast_path=True, enforce_eager=True, kv_cache_memory_bytes=1 << 22)


def test_the_fast_path_fuses_the_norms_and_the_reference_path_does_not(zoo_paths):
    path = str(zoo_paths["llama-gqa"])
    fast = _eager_fast_engine(path).loaded.model
    reference = LLM(path, dtype="float32", fast_path=False, kv_cache_memory_bytes=1 << 22).loaded.model
    # per layer: input and post-attention norms; plus the final norm
    assert sum(getattr(m, "add_kernel", None) is rms_norm_residual for m in fast.modules()) == 2 * 2 + 1
    assert all(getattr(m, "add_kernel", None) is None for m in reference.modules())


def test_a_copy_without_the_kernel_keeps_the_norms_unfused(monkeypatch, caplog, ours):
    def unwritten(dtype: torch.dtype) -> None:
        raise NotImplementedError("L17.T1: see the handout")

    monkeypatch.setattr(fused_norm, "warm_up", unwritten)
    engine_log = logging.getLogger("nanoengine")  # it does not propagate to caplog's root handler
    engine_log.addHandler(caplog.handler)
    try:
        assert use_fused_norms(ours("llama-gqa").model) == 0
    finally:
        engine_log.removeHandler(caplog.handler)
    assert "L17.T1" in caplog.text
    assert all(getattr(m, "add_kernel", None) is None for m in ours("llama-gqa").model.modules())


def test_the_profile_files_the_fused_norm_under_elementwise():
    assert category_of("nanoengine.rms_norm") == "elementwise"


def test_the_waterfall_draws_each_runs_categories_per_step():
    def report(events: list[tuple[str, float]], wall_s: float) -> dict:
        return {"categories": [{"category": r.category, "ms_per_step": r.ms_per_step}
                               for r in categorize(events, wall_s, steps=2)]}

    runs = [("module path", report([("aten::mm", 0.020), ("aten::add", 0.008)], 0.040)),
            ("fused", report([("nanoengine.fused_decode", 0.016), ("nanoengine.gemv", 0.004)], 0.022))]
    ax = step_waterfall(runs, "a test").axes[0]
    bars = ax.patches  # category by category, each with one bar per run (the first run on top)
    assert len(bars) == len(CATEGORIES) * len(runs)
    for run, (_, rep) in enumerate(runs):
        widths = [bars[i * len(runs) + run].get_width() for i in range(len(CATEGORIES))]
        assert widths == pytest.approx([row["ms_per_step"] for row in rep["categories"]])
    labels = {text.get_text() for text in ax.texts}
    assert {"20.0 ms", "11.0 ms"} <= labels  # each bar's total, per step


@given(arrivals=ARRIVALS, num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(4, 24), prefix_caching=st.booleans(), aborts=st.sets(st.integers(0, 30), max_size=4))
def test_the_persistent_batch_gives_lesson_06s_inputs(arrivals, num_blocks, block_size, budget, prefix_caching,
                                                       aborts):
    """Over random traffic (chunks, preemption, aborts, prefix-cache hits), the inputs written
    in place equal lesson 06's, built afresh each step: ids, positions, slots, padded tables."""
    batch = InputBatch(block_size)
    for plan in scheduler_traffic(arrivals, num_blocks, block_size, budget, prefix_caching, aborts):
        batch.forget(plan.finished_request_ids + plan.preempted_request_ids)
        if not plan.scheduled:
            continue
        input_ids, positions, metadata = batch.prepare(plan.scheduled)
        expected = build_attention_metadata([s.block_table for s in plan.scheduled],
                                            [s.num_computed_tokens for s in plan.scheduled],
                                            [len(s.token_ids) for s in plan.scheduled], block_size)
        assert input_ids.tolist() == [t for s in plan.scheduled for t in s.token_ids]
        assert positions.tolist() == [p for s in plan.scheduled
                                      for p in range(s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids))]
        assert metadata.slot_mapping.tolist() == expected.slot_mapping.tolist()
        assert torch.equal(metadata.block_tables, expected.block_tables)
        assert (metadata.query_start_loc, metadata.seq_lens) == (expected.query_start_loc, expected.seq_lens)


def test_a_row_follows_its_table_as_it_shrinks_and_is_reused():
    """Rejected guesses give blocks back and a shared block is copied on write; a finished
    request's row goes to the next request, with nothing of the old table left in it."""
    batch = InputBatch(2)
    params = SamplingParams()
    for table, position in [([3, 4, 5], 4), ([3, 4], 3), ([3, 8, 9], 5)]:
        scheduled = [ScheduledRequest("a", [1], position, table, True, params, [])]
        _, _, metadata = batch.prepare(scheduled)
        assert metadata.block_tables.tolist() == [table]
        assert metadata.slot_mapping.tolist() == [table[position // 2] * 2 + position % 2]
    batch.forget(["a"])
    _, _, metadata = batch.prepare([ScheduledRequest("b", [1], 0, [7], True, params, []),
                                    ScheduledRequest("c", [1, 2], 0, [6, 2, 1], True, params, [])])
    assert metadata.block_tables.tolist() == [[7, 0, 0], [6, 2, 1]]
    assert batch.rows == {"b": 0, "c": 1}


def test_decode_buckets_are_vllms_capture_sizes():
    assert decode_buckets(1) == [1]
    assert decode_buckets(16) == [1, 2, 4, 8, 16]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]


def test_an_engine_with_the_fused_step_warms_it_up_before_its_first_request(zoo_paths, caplog):
    """The fused step compiles at start (logged, timed) and a warmed engine's first request
    runs no compile; without the fused step (enforce_eager) nothing is warmed. The dummy steps
    write slot 0 only, which a request then overwrites: greedy tokens equal the eager path's."""
    path = str(zoo_paths["llama-gqa"])
    engine_log = logging.getLogger("nanoengine")
    engine_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, "nanoengine")
    try:
        warmed = LLM(path, dtype="float32", max_num_seqs=4, kv_cache_memory_bytes=1 << 22)
    finally:
        engine_log.removeHandler(caplog.handler)
    assert warmed.llm_engine.warmup_seconds > 0
    assert "warm-up: decode step at batch sizes 1, 2, 4 in" in caplog.text
    eager = _eager_fast_engine(path)
    assert eager.llm_engine.warmup_seconds is None
    params = SamplingParams(max_tokens=6, temperature=0)
    prompts = [{"prompt_token_ids": [3, 5, 8, 13]}, {"prompt_token_ids": [21, 34]}]
    assert ([o.outputs[0].token_ids for o in warmed.generate(prompts, params)]
            == [o.outputs[0].token_ids for o in eager.generate(prompts, params)])


def test_a_cached_kernels_key_follows_every_file_it_compiles_in(tmp_path):
    """The fused step's disk cache is keyed by its own file and by the files of the kernels it
    compiles in: a learner's edit of the attention kernel (L15.T1) must recompile it."""
    import importlib.util

    from nanoengine.numba_cache import _DependentSourcesLocator, cached_with

    def module(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded, path

    kernel, kernel_path = module("kernel_dep", "def kernel(x):\n    return x + 1\n")
    caller, caller_path = module("caller_dep", "def step(x):\n    return x\n")
    salt = ["c"]
    cached_with(kernel, salt=lambda: salt[0])(caller.step)

    def stamp() -> bytes:
        return _DependentSourcesLocator.from_function(caller.step, str(caller_path)).get_source_stamp()

    first = stamp()
    assert stamp() == first
    kernel_path.write_text("def kernel(x):\n    return x + 2\n")
    edited = stamp()
    assert edited != first
    salt[0] = "numba"
    assert stamp() != edited
    assert _DependentSourcesLocator.from_function(kernel.kernel, str(kernel_path)) is None  # not marked: numba's own


def test_the_decode_attention_custom_op_passes_torch_librarys_checks():
    """``torch.ops.nanoengine.decode_attention`` is what a compiled graph calls: its schema,
    its fake (shape-only) implementation and its result agree with the kernel's."""
    from nanoengine.attention.numba_cpu import decode_attention

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 9, 64, generator=generator)
    k_cache, v_cache = (torch.randn(10, 16, 3, 64, generator=generator) for _ in range(2))
    tables, lengths = torch.arange(8, dtype=torch.int32).view(4, 2), torch.tensor([5, 17, 32, 1])
    args = (q, k_cache, v_cache, tables, lengths, 0.125)
    torch.library.opcheck(torch.ops.nanoengine.decode_attention.default, args)
    assert torch.equal(torch.ops.nanoengine.decode_attention(*args), decode_attention(*args))
