"""``nanoengine bench latency``: how long one request takes, prefill and each decode step.

Runs a single random-token request (``ignore_eos``, exactly ``output_len`` new tokens)
through the chosen engine, ``num_iters`` times after warm-up, and reports the median with
min and max of end-to-end latency, prefill time (to the first token) and decode tokens/s,
plus the median time of every decode step (how step cost grows with sequence length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from nanoengine.bench.datasets import random_prompt_token_ids
from nanoengine.bench.machine import describe_machine
from nanoengine.bench.stats import format_summary, summary
from nanoengine.config import ModelConfig
from nanoengine.engine.inputs import Prompt
from nanoengine.engine.naive import NaiveEngine
from nanoengine.model import load_model
from nanoengine.sampling_params import SamplingParams

# engine name -> the NaiveEngine KV cache it runs on (the lessons' engines, in course order)
ENGINES = {"recompute": "none", "contiguous": "contiguous", "paged": "paged"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("latency", help="latency of one request: prefill and every decode step")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--engine", choices=sorted(ENGINES), default="contiguous",
                   help="recompute: lesson 01's loop; contiguous: lesson 02's KV cache; paged: lesson 04's")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (paged only)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None, help="write every measurement here")
    p.set_defaults(func=main)


def _one_run(engine: NaiveEngine, prompt: list[int], output_len: int, request_id: str) -> list[float]:
    """Seconds from submission to each output token."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    engine.add_request(request_id, Prompt(None, prompt), params)
    stamps = []
    while engine.has_unfinished_requests():
        stamps.extend(time.perf_counter() - start for _ in engine.step())
    return stamps


def main(args: argparse.Namespace) -> int:
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype, seed=args.seed))
    engine = NaiveEngine(loaded, kv_cache=ENGINES[args.engine], block_size=args.block_size, seed=args.seed)
    prompt = random_prompt_token_ids(1, args.input_len, loaded.hf_config.vocab_size, args.seed)[0]
    for i in range(args.num_iters_warmup):
        _one_run(engine, prompt, min(args.output_len, 8), f"warmup-{i}")
    runs = []
    for i in range(args.num_iters):
        runs.append(_one_run(engine, prompt, args.output_len, f"run-{i}"))
        print(f"iteration {i + 1}/{args.num_iters}: {runs[-1][-1]:.2f} s", file=sys.stderr)
    latency = [r[-1] for r in runs]
    prefill = [r[0] for r in runs]
    decode_tps = [(len(r) - 1) / (r[-1] - r[0]) for r in runs]
    steps_ms = [statistics.median(r[k] - r[k - 1] for r in runs) * 1e3 for k in range(1, len(runs[0]))]
    print(f"engine={args.engine} model={loaded.path.name} dtype={str(loaded.dtype).removeprefix('torch.')} "
          f"input_len={args.input_len} output_len={args.output_len}")
    print(format_summary("end-to-end latency", latency, "s"))
    print(format_summary("prefill (time to first token)", [p * 1e3 for p in prefill], "ms"))
    print(format_summary("decode", decode_tps, "tokens/s"))
    if args.result_json:
        result = {
            "command": "nanoengine bench " + " ".join(sys.argv[2:]),
            "date": datetime.date.today().isoformat(),
            "machine": describe_machine(),
            "model": loaded.path.name,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "engine": args.engine,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "latency_s": summary(latency),
            "prefill_s": summary(prefill),
            "decode_tokens_per_s": summary(decode_tps),
            "decode_step_ms": steps_ms,
        }
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
