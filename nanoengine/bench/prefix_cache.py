"""``nanoengine bench prefix-cache``: workload W4, many requests behind one long shared prefix.

``--num-prompts`` requests share a ``--prefix-len``-token prefix (a system prompt) and each
add ``--suffix-len`` tokens of their own, then generate ``--output-len`` tokens
(``ignore_eos``); all are submitted at once. The same requests run with prefix caching on and
off, and the benchmark reports time to first token (TTFT, from submission), total time, and
how many prompt tokens the engine had to compute. Each iteration draws a new prefix, so an
earlier iteration's cache never helps a later one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from nanoengine.bench.common import engine_kwargs, write_result
from nanoengine.bench.datasets import random_token_prompts
from nanoengine.bench.stats import format_summary, summary
from nanoengine.config import add_fast_path_arg
from nanoengine.platform import dtype_name
from nanoengine.sampling_params import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prefix-cache", help="TTFT and prefill work with and without prefix caching (W4)")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    add_fast_path_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def _prompts(args: argparse.Namespace, vocab: int, iteration: int) -> list[dict]:
    prompts = random_token_prompts([args.suffix_len] * args.num_prompts, vocab, args.seed + 1000 * iteration,
                                   args.prefix_len)
    return [{"prompt_token_ids": prompt} for prompt in prompts]


def _run_mode(args: argparse.Namespace, enable_prefix_caching: bool) -> dict:
    """Median-of-iterations figures for one setting of prefix caching."""
    from nanoengine import LLM

    llm = LLM(args.model, **engine_kwargs(args, enable_prefix_caching=enable_prefix_caching))
    vocab = llm.loaded.hf_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    # warm-up on a prefix no run uses (a negative iteration would not do: Random(-s) is Random(s))
    llm.generate(_prompts(args, vocab, args.num_iters)[:2], params, use_tqdm=False)
    stats = llm.llm_engine.kv_cache_manager.stats
    runs = []
    for i in range(args.num_iters):
        prompts = _prompts(args, vocab, i)
        hits_before = stats.hit_blocks
        started = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.monotonic() - started
        ttft = [out.metrics.first_token_time - started for out in outputs]
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        runs.append({
            "ttft_mean_s": statistics.fmean(ttft),
            "ttft_p50_s": statistics.median(ttft),
            "ttft_max_s": max(ttft),
            "elapsed_s": elapsed,
            "prompt_tokens": prompt_tokens,
            "prompt_tokens_computed": prompt_tokens - (stats.hit_blocks - hits_before) * args.block_size,
        })
        print(f"prefix caching {'on' if enable_prefix_caching else 'off'}, iteration {i + 1}/{args.num_iters}: "
              f"{elapsed:.1f} s", file=sys.stderr)
    label = "on " if enable_prefix_caching else "off"
    print(format_summary(f"prefix caching {label}: TTFT mean", [r["ttft_mean_s"] for r in runs], "s"))
    print(format_summary(f"prefix caching {label}: TTFT max ", [r["ttft_max_s"] for r in runs], "s"))
    print(format_summary(f"prefix caching {label}: total time", [r["elapsed_s"] for r in runs], "s"))
    print(f"prefix caching {label}: prompt tokens computed {runs[-1]['prompt_tokens_computed']} "
          f"of {runs[-1]['prompt_tokens']}")
    return {
        "model": llm.loaded.path.name,
        "dtype": dtype_name(llm.loaded.dtype),
        **{k: summary([r[k] for r in runs]) for k in runs[0]},
    }


def main(args: argparse.Namespace) -> int:
    print(f"W4: {args.num_prompts} requests, shared prefix {args.prefix_len}, own suffix {args.suffix_len}, "
          f"output {args.output_len}, block size {args.block_size}")
    on = _run_mode(args, True)
    off = _run_mode(args, False)
    speedup = off["ttft_mean_s"]["median"] / on["ttft_mean_s"]["median"]
    saved = 1 - on["prompt_tokens_computed"]["median"] / off["prompt_tokens_computed"]["median"]
    print(f"TTFT (mean) {speedup:.1f}x better with prefix caching; prefill tokens saved {saved:.1%}")
    write_result(args.result_json, {
        "num_prompts": args.num_prompts, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
        "output_len": args.output_len, "block_size": args.block_size,
        "prefix_caching_on": on, "prefix_caching_off": off,
        "ttft_mean_speedup": speedup, "prefill_tokens_saved": saved,
    })
    return 0
