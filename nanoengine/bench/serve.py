"""``nanoengine bench serve``: load any OpenAI-compatible server and time what its users see,
as vLLM's ``benchmark_serving``.

``--num-prompts`` requests are sent to ``/v1/completions`` with ``stream: true`` and
``ignore_eos`` (so each generates exactly its output length, on servers that honour vLLM's
extras): random token ids (``--input-len`` and ``--output-len`` spread by ``--range-ratio``,
after a ``--prefix-len`` prefix they all share; new ones each iteration, so a server's prefix
cache cannot serve one run from the last) or the lines of a JSONL ``--dataset-path``.
Requests arrive at ``--request-rate`` per second (Poisson arrivals from the seed; ``inf``
sends all at once), at most ``--concurrency`` in flight. For each request the client
records when every streamed chunk arrived: time to first token (TTFT), time per output
token after the first (TPOT), the gaps between chunks (inter-token latency, ITL) and the
end-to-end latency (E2E). Reports requests/s, output and total tokens/s, and the mean,
median (p50) and p99 of each latency. Works against nanoengine, vLLM or llama-server alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from nanoengine.bench.common import add_workload_args, describe_workload, workload, workload_record, write_result
from nanoengine.bench.stats import percentiles, summary

# the latencies reported, as (key in a run's result, label, unit)
_LATENCIES = (("ttft_s", "TTFT", "s"), ("tpot_ms", "TPOT", "ms"), ("itl_ms", "ITL", "ms"), ("e2e_s", "E2E", "s"))
# every figure reported, as (name in a run's result, label, unit)
_REPORTED = (
    ("requests_per_s", "throughput", "requests/s"), ("output_tokens_per_s", "output", "tokens/s"),
    ("total_tokens_per_s", "total", "tokens/s"),
    *((f"{key}.{stat}", f"{label} {stat}", unit) for key, label, unit in _LATENCIES for stat in ("mean", "p50", "p99")),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="load a running OpenAI-compatible server: TTFT, TPOT, ITL, throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    p.add_argument("--api-key", default=None)
    add_workload_args(p)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--vocab-size", type=int, default=49152, help="token ids are drawn below this")
    p.add_argument("--num-iters", type=int, default=3, help="repeat the whole load; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def poisson_arrivals(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """When to send each request, in seconds from the start: the first at once, then gaps drawn
    from an exponential distribution of mean ``1 / request_rate`` (a Poisson process, as vLLM's
    benchmark); all at once for an infinite rate."""
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be positive; got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


def _latency_stats(values: list[float], scale: float = 1.0) -> dict[str, float]:
    scaled = [v * scale for v in values]
    return {**percentiles(scaled, (50, 99)), "mean": statistics.fmean(scaled) if scaled else 0.0}


def summarize(results: list[dict], elapsed: float) -> dict:
    """One run's figures from its requests' records (``stamps``: seconds from sending to each
    streamed chunk; ``prompt_tokens``, ``output_tokens``, ``e2e``). TPOT is vLLM's:
    ``(e2e - ttft) / (output_tokens - 1)``, so a chunk carrying several tokens counts them all."""
    streamed = [r for r in results if r["stamps"]]
    output_tokens = sum(r["output_tokens"] for r in results)
    tpot = [(r["e2e"] - r["stamps"][0]) / (r["output_tokens"] - 1) for r in streamed if r["output_tokens"] > 1]
    return {
        "num_requests": len(results),
        "elapsed_s": elapsed,
        "requests_per_s": len(results) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + sum(r["prompt_tokens"] for r in results)) / elapsed,
        "ttft_s": _latency_stats([r["stamps"][0] for r in streamed]),
        "tpot_ms": _latency_stats(tpot, 1e3),
        "itl_ms": _latency_stats([b - a for r in streamed for a, b in zip(r["stamps"], r["stamps"][1:])], 1e3),
        "e2e_s": _latency_stats([r["e2e"] for r in results]),
    }


def _refused(response, body: str) -> ValueError:
    """A non-200 answer as one line: the status, the path and the start of the body."""
    return ValueError(f"the server answered {response.status_code} to {response.url.path}: {body[:300]}")


async def _one(client, body: dict, headers: dict) -> dict:
    """Send one streaming request; return its chunk arrival times and token counts (the
    prompt's from the server's usage, since only the server tokenizes a text prompt)."""
    started = time.perf_counter()
    stamps, output_tokens = [], 0
    prompt_tokens = len(body["prompt"]) if isinstance(body["prompt"], list) else 0
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise _refused(response, (await response.aread()).decode(errors="replace"))
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter() - started)
            if chunk.get("usage"):
                output_tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"].get("prompt_tokens", prompt_tokens)
    return {"stamps": stamps, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "e2e": time.perf_counter() - started}


async def _model_name(client, headers: dict) -> str:
    response = await client.get("/v1/models", headers=headers)
    if response.status_code != 200:
        raise _refused(response, response.text)
    return response.json()["data"][0]["id"]


async def _run(args: argparse.Namespace, iteration: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    requests = workload(args, args.vocab_size, iteration)
    arrivals = poisson_arrivals(len(requests), args.request_rate, args.seed + 1000 * iteration)
    limit = asyncio.Semaphore(args.concurrency)
    try:
        # A new connection per request: servers close kept-alive connections on their own terms
        # (llama-server after a few requests), and a request sent on one that is closing fails.
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=no_keepalive) as client:
            model = args.model or await _model_name(client, headers)
            with tqdm(total=len(requests), desc="Finished requests", leave=False) as bar:

                async def send(prompt: str | list[int], output_len: int, send_at: float) -> dict:
                    await asyncio.sleep(send_at - time.perf_counter())
                    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                    async with limit:
                        result = await _one(client, body, headers)
                    bar.update(1)
                    return result

                started = time.perf_counter()
                async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
                    tasks = [group.create_task(send(p, o, started + t)) for (p, o), t in zip(requests, arrivals)]
                elapsed = time.perf_counter() - started
    except* httpx.HTTPError as failures:
        exc = failures.exceptions[0]
        raise ValueError(f"request to {args.base_url} failed ({type(exc).__name__}: {exc})") from None
    return {"model": model, **summarize([t.result() for t in tasks], elapsed)}


def _run_iteration(args: argparse.Namespace, iteration: int) -> dict:
    """One load of the server; a failure is one ValueError (cli prints it without a traceback)."""
    try:
        return asyncio.run(_run(args, iteration))
    except* ValueError as failures:
        raise failures.exceptions[0] from None


def _value(run: dict, name: str) -> float:
    for key in name.split("."):
        run = run[key]
    return run


def main(args: argparse.Namespace) -> int:
    runs = []
    for i in range(args.num_iters):
        runs.append(_run_iteration(args, i))
        print(f"iteration {i + 1}/{args.num_iters}: {runs[-1]['elapsed_s']:.1f} s", file=sys.stderr)
    print(f"{runs[0]['num_requests']} requests, {describe_workload(args)}, request rate {args.request_rate}/s, "
          f"concurrency {args.concurrency}, model {runs[0]['model']}; medians of {len(runs)} (min, max)")
    medians = {}
    for name, label, unit in _REPORTED:
        s = medians[name] = summary([_value(r, name) for r in runs])
        print(f"{label:11} {s['median']:9.3f} {unit} ({s['min']:.3f}, {s['max']:.3f})")
    write_result(args.result_json, {
        "model": runs[0]["model"], **workload_record(args, runs[0]["num_requests"]),
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "concurrency": args.concurrency, "medians": medians, "runs": runs,
    })
    return 0
