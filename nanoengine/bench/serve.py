"""``nanoengine bench serve``: load any OpenAI-compatible server and time what its users see.

``--num-prompts`` requests of random token ids (``--input-len``, fixed seed) are sent to
``/v1/completions`` with ``stream: true`` and ``ignore_eos`` (so each generates exactly
``--output-len`` tokens, on servers that honour vLLM's extras), at most ``--concurrency`` at a
time. For each request the client records when every streamed chunk arrived: time to first
token (TTFT), time per output token after the first (TPOT), the gaps between chunks
(inter-token latency, ITL) and the end-to-end latency. Reports requests/s, output and total
tokens/s, and p50/p99 of each latency. Works against nanoengine, vLLM or llama-server alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from nanoengine.bench.datasets import random_prompt_token_ids
from nanoengine.bench.machine import describe_machine
from nanoengine.bench.stats import summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="load a running OpenAI-compatible server: TTFT, TPOT, ITL, throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--vocab-size", type=int, default=49152, help="token ids are drawn below this")
    p.add_argument("--num-iters", type=int, default=3, help="repeat the whole load; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.5), "p99": at(0.99), "mean": statistics.fmean(ordered)}


async def _one(client, url: str, body: dict, headers: dict) -> dict:
    """Send one streaming request; return its chunk arrival times and token count."""
    started = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter() - started)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"stamps": stamps, "tokens": tokens, "e2e": time.perf_counter() - started}


async def _run(args: argparse.Namespace, iteration: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None) as client:
        model = args.model or (await client.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        # new prompts each iteration, so a server's prefix cache cannot serve one run from the last
        prompts = random_prompt_token_ids(args.num_prompts, args.input_len, args.vocab_size, args.seed + 1000 * iteration)
        limit = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: list[int]) -> dict:
            body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with limit:
                return await _one(client, "/v1/completions", body, headers)

        started = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        elapsed = time.perf_counter() - started
    output_tokens = sum(r["tokens"] for r in results)
    ttft = [r["stamps"][0] for r in results if r["stamps"]]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in results if len(r["stamps"]) > 1]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {
        "model": model,
        "elapsed_s": elapsed,
        "requests_per_s": len(results) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + args.input_len * len(results)) / elapsed,
        "ttft_s": _percentiles(ttft),
        "tpot_ms": {k: v * 1e3 for k, v in _percentiles(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in _percentiles(itl).items()},
        "e2e_s": _percentiles([r["e2e"] for r in results]),
    }


# The figures reported, as (name in a run's result, label, unit).
_REPORTED = (
    ("requests_per_s", "throughput", "requests/s"), ("output_tokens_per_s", "output", "tokens/s"),
    ("total_tokens_per_s", "total", "tokens/s"), ("ttft_s.p50", "TTFT p50", "s"), ("ttft_s.p99", "TTFT p99", "s"),
    ("tpot_ms.p50", "TPOT p50", "ms"), ("tpot_ms.p99", "TPOT p99", "ms"), ("itl_ms.p99", "ITL p99", "ms"),
    ("e2e_s.p50", "E2E p50", "s"),
)


def _value(run: dict, name: str) -> float:
    for key in name.split("."):
        run = run[key]
    return run


def main(args: argparse.Namespace) -> int:
    runs = []
    for i in range(args.num_iters):
        runs.append(asyncio.run(_run(args, i)))
        print(f"iteration {i + 1}/{args.num_iters}: {runs[-1]['elapsed_s']:.1f} s", file=sys.stderr)
    print(f"{args.num_prompts} requests, input {args.input_len}, output {args.output_len}, "
          f"concurrency {args.concurrency}, model {runs[0]['model']}; medians of {len(runs)} (min, max)")
    medians = {}
    for name, label, unit in _REPORTED:
        s = medians[name] = summary([_value(r, name) for r in runs])
        print(f"{label:11} {s['median']:9.3f} {unit} ({s['min']:.3f}, {s['max']:.3f})")
    if args.result_json:
        record = {"command": "nanoengine bench " + " ".join(sys.argv[2:]), "date": datetime.date.today().isoformat(),
                  "machine": describe_machine(), "model": runs[0]["model"], "num_prompts": args.num_prompts,
                  "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency,
                  "medians": medians, "runs": runs}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(record, indent=1) + "\n")
    return 0
