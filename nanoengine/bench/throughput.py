"""``nanoengine bench throughput``: an offline batch through ``LLM.generate``, shaped like vLLM's.

Random-token prompts (fixed seed) of ``--input-len`` and outputs of ``--output-len``
(``ignore_eos``, so every request generates exactly its length), both spread by
``--range-ratio``. Reports requests/s, total and output tokens/s, and per-request time to
first token (TTFT) and time per output token (TPOT), medians of ``--num-iters`` runs.

``--static-batching`` runs the same engine the way engines did before continuous batching:
requests go in waves of ``max_num_seqs`` and a wave starts only when the previous one has
finished, so a short request's slot idles until the longest of its wave is done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from nanoengine.bench.datasets import random_lengths, random_prompt_token_ids
from nanoengine.bench.machine import describe_machine
from nanoengine.bench.stats import format_summary, summary
from nanoengine.config import parse_size
from nanoengine.outputs import RequestOutput
from nanoengine.sampling_params import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("throughput", help="offline batch throughput, TTFT and TPOT")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="spread lengths uniformly by ± this share")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--kv-cache-memory", default=None, help="KV budget (bytes, or 512MiB, 1GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--static-batching", action="store_true", help="waves of max_num_seqs, each waiting for the last")
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def _per_request(outputs: list[RequestOutput], started: float) -> tuple[list[float], list[float]]:
    """TTFT from submission (all requests are submitted at ``started``), and TPOT after the first token."""
    ttft, tpot = [], []
    for out in outputs:
        m = out.metrics
        ttft.append(m.first_token_time - started)
        n = len(out.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.finished_time - m.first_token_time) / (n - 1))
    return ttft, tpot


def main(args: argparse.Namespace) -> int:
    from nanoengine import LLM

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, block_size=args.block_size,
              kv_cache_memory_bytes=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_chunked_prefill=args.enable_chunked_prefill)
    lengths = random_lengths(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    vocab = llm.loaded.hf_config.vocab_size
    prompts = [{"prompt_token_ids": random_prompt_token_ids(1, p, vocab, args.seed + i)[0]} for i, (p, _) in enumerate(lengths)]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, detokenize=False) for _, o in lengths]
    wave = args.max_num_seqs if args.static_batching else len(prompts)
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up: first-use kernel set-up
    runs = []
    for i in range(args.num_iters):
        started = time.monotonic()
        outputs = []
        for w in range(0, len(prompts), wave):
            outputs += llm.generate(prompts[w : w + wave], params[w : w + wave], use_tqdm=False)
        elapsed = time.monotonic() - started
        ttft, tpot = _per_request(outputs, started)
        runs.append({
            "elapsed_s": elapsed,
            "requests_per_s": len(outputs) / elapsed,
            "total_tokens_per_s": sum(p + o for p, o in lengths) / elapsed,
            "output_tokens_per_s": sum(o for _, o in lengths) / elapsed,
            "ttft_p50_s": statistics.median(ttft),
            "tpot_p50_ms": statistics.median(tpot) * 1e3 if tpot else 0.0,
        })
        print(f"iteration {i + 1}/{args.num_iters}: {elapsed:.1f} s", file=sys.stderr)
    keys = list(runs[0])
    result = {k: summary([r[k] for r in runs]) for k in keys}
    mode = "static batching" if args.static_batching else "continuous batching"
    print(f"{mode}: {args.num_prompts} requests, input {args.input_len}, output {args.output_len}, "
          f"range ratio {args.range_ratio}, max_num_seqs {args.max_num_seqs}, "
          f"budget {llm.llm_engine.scheduler.token_budget} tokens/step")
    print(format_summary("throughput", [r["requests_per_s"] for r in runs], "requests/s"))
    print(format_summary("total", [r["total_tokens_per_s"] for r in runs], "tokens/s"))
    print(format_summary("output", [r["output_tokens_per_s"] for r in runs], "tokens/s"))
    print(format_summary("TTFT p50", [r["ttft_p50_s"] for r in runs], "s"))
    print(format_summary("TPOT p50", [r["tpot_p50_ms"] for r in runs], "ms"))
    print(f"preemptions: {llm.llm_engine.scheduler.num_preemptions}")
    if args.result_json:
        record = {
            "command": "nanoengine bench " + " ".join(sys.argv[2:]),
            "date": datetime.date.today().isoformat(),
            "machine": describe_machine(),
            "model": llm.loaded.path.name,
            "dtype": str(llm.loaded.dtype).removeprefix("torch."),
            "mode": mode,
            "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
            "range_ratio": args.range_ratio, "max_num_seqs": args.max_num_seqs,
            "token_budget": llm.llm_engine.scheduler.token_budget,
            "preemptions": llm.llm_engine.scheduler.num_preemptions,
            **result,
        }
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(record, indent=1) + "\n")
    return 0
