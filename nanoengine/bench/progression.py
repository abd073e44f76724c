"""``nanoengine bench progression``: one workload through every engine the course builds.

The stages, in course order, each adding one idea to the one before:

1. lesson 01's loop: one request at a time, every step recomputes the whole sequence;
2. + the KV cache (lesson 02), still one request at a time;
3. + paging (lesson 04): the cache in blocks, still one at a time;
4. + continuous batching (lesson 06): every request in flight at once, chunked prefill;
5. + prefix caching (lesson 08): the shared system prompt is computed once;
6. + the fast path (lesson 15): prepacked bf16 weights, the numba CPU attention kernel.

The workload is small enough for stage 1 to finish (its cost is quadratic): ``--num-prompts``
requests whose prompts share a ``--prefix-len`` system prompt, each with ``--input-len``
tokens of its own, generating ``--output-len`` tokens (``ignore_eos``). Each iteration draws
new prompts, so a prefix cached in one iteration never serves the next. Reports total
(prompt + output) tokens/s per stage, median of ``--num-iters`` with min and max.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from nanoengine.bench.common import write_result
from nanoengine.bench.datasets import random_token_prompts
from nanoengine.bench.stats import format_summary, summary
from nanoengine.platform import dtype_name
from nanoengine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True, slots=True)
class Stage:
    """One engine of the course: a NaiveEngine cache kind, or LLMEngine with its options."""

    label: str
    naive_cache: str | None = None  # "none" | "contiguous" | "paged": lessons 01-04's engine
    prefix_caching: bool = False
    fast_path: bool = False


STAGES = (
    Stage("lesson 01: recompute", naive_cache="none"),
    Stage("+ KV cache (02)", naive_cache="contiguous"),
    Stage("+ paging (04)", naive_cache="paged"),
    Stage("+ continuous batching (06)"),
    Stage("+ prefix caching (08)", prefix_caching=True),
    Stage("+ fast path (15)", prefix_caching=True, fast_path=True),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("progression", help="one workload through every engine of the course")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=64, help="system prompt every request shares")
    p.add_argument("--input-len", type=int, default=32, help="each request's own prompt tokens")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def _llm_for(args: argparse.Namespace, stage: Stage):  # noqa: ANN202 (an LLM, imported lazily)
    from nanoengine import LLM
    from nanoengine.engine.naive import NaiveEngine

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, enable_prefix_caching=stage.prefix_caching,
              fast_path=stage.fast_path)
    if stage.naive_cache is not None:
        llm.llm_engine = NaiveEngine(llm.loaded, kv_cache=stage.naive_cache, seed=args.seed)
    return llm


def _run(llm, args: argparse.Namespace, iteration: int) -> float:  # noqa: ANN001
    """Seconds to finish one iteration's requests, all submitted at once."""
    vocab = llm.loaded.hf_config.vocab_size
    prompts = random_token_prompts([args.input_len] * args.num_prompts, vocab, args.seed + 1000 * iteration,
                                   args.prefix_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - started


def main(args: argparse.Namespace) -> int:
    tokens = args.num_prompts * (args.prefix_len + args.input_len + args.output_len)
    stages, dtype = [], None
    for stage in STAGES:
        llm = _llm_for(args, stage)
        dtype = dtype_name(llm.loaded.dtype)
        _run(llm, args, args.num_iters)  # warm-up on prompts no timed iteration uses
        seconds = []
        for i in range(args.num_iters):
            seconds.append(_run(llm, args, i))
            print(f"{stage.label}, iteration {i + 1}/{args.num_iters}: {seconds[-1]:.1f} s", file=sys.stderr)
        rates = [tokens / s for s in seconds]
        print(format_summary(f"{stage.label:28}", rates, "total tokens/s"))
        stages.append({**dataclasses.asdict(stage), "elapsed_s": summary(seconds), "total_tokens_per_s": summary(rates)})
        del llm
    write_result(args.result_json, {
        "model": args.model or "SmolLM2-135M-Instruct", "dtype": dtype, "num_prompts": args.num_prompts,
        "prefix_len": args.prefix_len, "input_len": args.input_len, "output_len": args.output_len, "stages": stages,
    })
    return 0
