"""``python -m nanoengine.viz.make_figures``: regenerate every figure in ``figures/``.

Inputs are fixed (the bundled model's config, recorded benchmark JSON in ``docs/bench/``,
the example paging, scheduler and prefix-cache traces, logits and beams of
:mod:`nanoengine.viz.examples`, the kernel's default launch shape), so a rerun gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from nanoengine.model import load_hf_config  # noqa: E402
from nanoengine.trace import replay  # noqa: E402
from nanoengine.viz import (  # noqa: E402
    batching_throughput,
    beam_tree,
    block_pool_grid,
    block_tables,
    chunk_size_tradeoff,
    example_beam_output,
    example_logits,
    example_paging_trace,
    example_prefix_trace,
    example_scheduler_trace,
    kernel_thread_mapping,
    kv_cache_speed,
    model_anatomy,
    paged_vs_contiguous,
    prefix_tree,
    progression_chart,
    sampling_effects,
    save_figure,
    scheduler_gantt,
    token_timeline,
    trace_colors,
)
from nanoengine.viz.examples import BEAM_PROMPT, BEAM_VOCAB, EXAMPLE_VOCAB  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str) -> dict | None:
    path = ROOT / "docs" / "bench" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "figures")
    args = parser.parse_args(argv)
    config = load_hf_config(None)
    written = [
        save_figure(model_anatomy(config, "SmolLM2-135M-Instruct"), args.out / "model_anatomy.png"),
        save_figure(token_timeline(), args.out / "token_timeline.png"),
    ]
    results = [r for r in (_bench("l02_recompute"), _bench("l02_contiguous")) if r]
    if results:
        written.append(save_figure(kv_cache_speed(results), args.out / "kv_cache_speed.png"))
    trace = example_paging_trace()
    last, colors = replay(trace)[-1], trace_colors(trace)
    written += [
        save_figure(block_pool_grid(last, trace.block_size, colors=colors), args.out / "block_pool.png"),
        save_figure(block_tables(last, trace.block_size, colors=colors), args.out / "block_tables.png"),
    ]
    memory = _bench("l03_kv_memory")
    if memory:
        written.append(save_figure(paged_vs_contiguous(memory), args.out / "paged_vs_contiguous.png"))
    written.append(save_figure(kernel_thread_mapping(), args.out / "kernel_thread_mapping.png"))
    written.append(save_figure(scheduler_gantt(*example_scheduler_trace()), args.out / "scheduler_gantt.png"))
    static, continuous = _bench("l06_static"), _bench("l06_continuous")
    if static and continuous:
        written.append(save_figure(batching_throughput(static, continuous), args.out / "continuous_vs_static.png"))
    budgets = [r for r in (_bench(f"l07_budget_{b}") for b in (64, 256, 2048)) if r]
    if budgets:
        written.append(save_figure(chunk_size_tradeoff(budgets), args.out / "chunked_prefill_tradeoff.png"))
    written += [
        save_figure(prefix_tree(example_prefix_trace()), args.out / "prefix_tree.png"),
        save_figure(sampling_effects(example_logits(), labels=EXAMPLE_VOCAB), args.out / "sampling_processors.png"),
        save_figure(beam_tree(example_beam_output(), len(BEAM_PROMPT), labels=BEAM_VOCAB.__getitem__),
                    args.out / "beam_tree.png"),
    ]
    progression = _bench("l15_progression")
    if progression:
        written.append(save_figure(progression_chart(progression), args.out / "progression.png"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
