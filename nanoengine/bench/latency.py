"""``nanoengine bench latency``: how long a batch takes, prefill and each decode step, as vLLM's
``benchmark_latency``.

Submits ``--batch-size`` random-token prompts of ``--input-len`` at once (``ignore_eos``, so
each generates exactly ``--output-len`` tokens) to the chosen engine, ``--num-iters`` times
after ``--num-iters-warmup``, and drives it step by step so every token's time is exact.
Reports the batch's end-to-end latency, prefill time (until every request has its first
token) and prefill and decode tokens/s (median, min and max of the runs); percentiles of
every request's end-to-end latency across the runs; and the median time of every decode
step (how step cost grows with sequence length). Each run draws new prompts, so the
prefix cache never serves one run from an earlier one. ``--profile PATH`` runs the timed
runs under ``torch.profiler`` and says where each step's time went
(:mod:`nanoengine.bench.profile`).

The engines: lessons 01–04's one-request-at-a-time ``NaiveEngine`` over each KV cache
(batch size 1 only), or ``llm``, the full engine under ``nanoengine.LLM``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nanoengine.bench.common import (
    add_profile_arg, add_quantization_arg, add_speculative_arg, engine_kwargs, write_result,
)
from nanoengine.bench.datasets import load_jsonl_dataset, random_token_prompts
from nanoengine.bench.profile import BenchProfiler
from nanoengine.bench.stats import format_summary, percentiles, summary
from nanoengine.config import ModelConfig, add_fast_path_arg
from nanoengine.engine.inputs import Prompt
from nanoengine.engine.naive import NaiveEngine
from nanoengine.model import load_model
from nanoengine.model.loader import LoadedModel
from nanoengine.parallel.launch import add_parallel_arguments
from nanoengine.platform import dtype_name
from nanoengine.sampling_params import RequestOutputKind, SamplingParams

# engine name -> the NaiveEngine KV cache it runs on (the lessons' engines, in course order)
ENGINES = {"recompute": "none", "contiguous": "contiguous", "paged": "paged"}
LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("latency", help="latency of a batch: prefill and every decode step")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--engine", choices=[*sorted(ENGINES), "llm"], default="contiguous",
                   help="recompute: lesson 01's loop; contiguous: lesson 02's KV cache; paged: lesson 04's; "
                        "llm: the full engine (continuous batching, paged)")
    p.add_argument("--batch-size", type=int, default=1, help="requests submitted together (above 1: --engine llm)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (paged and llm)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="llm only")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="llm only")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dataset-path", type=Path, default=None,
                   help='JSONL of {"prompt": text} or {"prompt_token_ids": [...]} instead of random ids: iteration '
                        "i runs lines i*B .. i*B+B-1 (B = --batch-size, cycling through the file); --input-len is ignored")
    add_speculative_arg(p)
    add_quantization_arg(p)
    add_fast_path_arg(p)
    add_parallel_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None, help="write every measurement here")
    add_profile_arg(p)
    p.set_defaults(func=main)


@dataclasses.dataclass(slots=True)
class BatchRun:
    """One batch's timings, in seconds from its submission: when each request got its first
    token and finished, and ``(time, tokens produced)`` of every step that produced any."""

    first_token: list[float]
    finished: list[float]
    steps: list[tuple[float, int]]

    @property
    def prefill_s(self) -> float:
        """Until the last request of the batch has its first token: the batch's prefill."""
        return max(self.first_token)

    @property
    def latency_s(self) -> float:
        return max(self.finished)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after the batch's prefill, per second: a request whose prefill ended
        early decodes during the others' prefill, and those tokens do not count."""
        decoded = sum(n for t, n in self.steps if t > self.prefill_s)
        return decoded / (self.latency_s - self.prefill_s)

    @property
    def decode_tokens_per_step(self) -> float:
        """Tokens the batch gained per engine step after its prefill: at batch 1, tokens per
        forward pass of the model (1.0 without speculation)."""
        decode = [n for t, n in self.steps if t > self.prefill_s]
        return sum(decode) / len(decode) if decode else 0.0

    @property
    def decode_step_s(self) -> list[float]:
        """The duration of every step after the batch's prefill."""
        times = [t for t, _ in self.steps if t >= self.prefill_s]
        return [b - a for a, b in zip(times, times[1:])]


def _one_run(engine, prompts: list[list[int]], output_len: int, tag: str,
             step_range: Callable[[bool], contextlib.AbstractContextManager] = lambda decode: contextlib.nullcontext(),
             ) -> BatchRun:
    """Submit every prompt at once and step the engine (an ``LLMEngine`` or a ``NaiveEngine``)
    until all are done, timing each step's outputs and counting the tokens each step added
    (several per request with speculative decoding). ``step_range(decode)``: entered around
    each step (``--profile``'s range), ``decode`` once every request has its first token."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", Prompt(None, prompt), params)
    first, finished, steps = {}, {}, []
    while engine.has_unfinished_requests():
        with step_range(len(first) == len(prompts)):
            outputs = engine.step()
        now = time.perf_counter() - start
        gained = 0
        for out in outputs:
            first.setdefault(out.request_id, now)
            gained += len(out.outputs[0].token_ids)
            if out.finished:
                finished[out.request_id] = now
        if outputs:
            steps.append((now, gained))
    return BatchRun(list(first.values()), list(finished.values()), steps)


def _engine(args: argparse.Namespace) -> tuple[object, LoadedModel]:
    """The engine to time, and the model under it."""
    if args.engine == "llm":
        from nanoengine import LLM

        llm = LLM(args.model, **engine_kwargs(args))
        return llm.llm_engine, llm.loaded
    if args.batch_size != 1:
        raise ValueError(f"--batch-size {args.batch_size} needs --engine llm; {args.engine} runs one request at a time")
    if args.speculative_config is not None:
        raise ValueError(f"--speculative-config needs --engine llm; {args.engine} does not speculate")
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        raise ValueError(f"parallel ranks need --engine llm; {args.engine} runs on one")
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype, seed=args.seed, quantization=args.quantization))
    return NaiveEngine(loaded, kv_cache=ENGINES[args.engine], block_size=args.block_size, seed=args.seed), loaded


def main(args: argparse.Namespace) -> int:
    if args.output_len < 2:
        raise ValueError("--output-len must be at least 2: decode starts after the first token")
    engine, loaded = _engine(args)

    lines = load_jsonl_dataset(args.dataset_path) if args.dataset_path else []

    def prompts(iteration: int) -> list[list[int]]:
        if lines:  # iteration i takes the next --batch-size lines, cycling through the file
            first = iteration * args.batch_size
            chosen = [lines[(first + i) % len(lines)].prompt for i in range(args.batch_size)]
            return [p if isinstance(p, list) else loaded.tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in chosen]
        return random_token_prompts([args.input_len] * args.batch_size, loaded.hf_config.vocab_size,
                                    args.seed + 1000 * iteration)

    for i in range(args.num_iters_warmup):
        _one_run(engine, prompts(args.num_iters + i), min(args.output_len, 8), f"warmup-{i}")  # prompts no run uses
    runs, prefill_tps = [], []
    spec_before = _spec_counts(engine)
    batches = [prompts(i) for i in range(args.num_iters)]  # drawn before, so the profile holds only the runs
    profiler = BenchProfiler(args.profile)
    with profiler:  # the timed runs, not the warm-up
        for i, batch in enumerate(batches):
            runs.append(_one_run(engine, batch, args.output_len, f"run-{i}", profiler.step_range))
            prefill_tps.append(sum(map(len, batch)) / runs[-1].prefill_s)
            print(f"iteration {i + 1}/{args.num_iters}: {runs[-1].latency_s:.2f} s", file=sys.stderr)
    latency = [r.latency_s for r in runs]
    prefill = [r.prefill_s for r in runs]
    decode_tps = [r.decode_tokens_per_s for r in runs]
    tokens_per_step = [r.decode_tokens_per_step for r in runs]
    speculation = _speculation_record(engine, spec_before)
    if args.engine == "llm":
        engine.shutdown()
    requests = [t for r in runs for t in r.finished]
    request_latency = {"mean": statistics.fmean(requests), **percentiles(requests, LATENCY_PERCENTILES)}
    steps_ms = [statistics.median(step) * 1e3 for step in zip(*(r.decode_step_s for r in runs))]
    print(f"engine={args.engine} model={loaded.path.name} dtype={dtype_name(loaded.dtype)} "
          f"quantization={loaded.quantization} weights={loaded.weight_bytes / 1e6:.1f} MB (rank 0) "
          f"tp={loaded.layout.tp.size} pp={loaded.layout.pp.size} batch_size={args.batch_size} "
          f"{f'dataset={args.dataset_path}' if args.dataset_path else f'input_len={args.input_len}'} "
          f"output_len={args.output_len}")
    warmup_s = getattr(engine, "warmup_seconds", None)  # lesson 17: the engine's warm-up at start
    if warmup_s is not None:
        print(f"warm-up at start: {warmup_s:.1f} s")
    print(format_summary("end-to-end latency", latency, "s"))
    print("request latency: " + ", ".join(f"{k} {v:.3f} s" for k, v in request_latency.items()))
    print(format_summary("prefill (time to first token)", [p * 1e3 for p in prefill], "ms"))
    print(format_summary("prefill", prefill_tps, "tokens/s"))
    print(format_summary("decode", decode_tps, "tokens/s"))
    print(format_summary("decode tokens per engine step", tokens_per_step, "tokens"))
    if speculation:
        print(f"speculation: {speculation['num_accepted_tokens']} of {speculation['num_draft_tokens']} guesses "
              f"accepted ({speculation['acceptance_rate']:.1%}), mean acceptance length "
              f"{speculation['mean_acceptance_length']:.2f}")
    profile = profiler.report()
    write_result(args.result_json, {
        "model": loaded.path.name,
        "dtype": dtype_name(loaded.dtype),
        "quantization": loaded.quantization,
        "weight_bytes": loaded.weight_bytes,
        "tensor_parallel_size": loaded.layout.tp.size,
        "pipeline_parallel_size": loaded.layout.pp.size,
        "engine": args.engine,
        "warmup_s": warmup_s,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "latency_s": summary(latency),
        "request_latency_s": request_latency,
        "prefill_s": summary(prefill),
        "prefill_tokens_per_s": summary(prefill_tps),
        "decode_tokens_per_s": summary(decode_tps),
        "decode_step_ms": steps_ms,
        "decode_tokens_per_step": summary(tokens_per_step),
        "dataset_path": str(args.dataset_path) if args.dataset_path else None,
        "speculative_config": args.speculative_config,
        "speculation": speculation,
        **({"profile": profile} if profile else {}),
    })
    return 0


HISTORY_RECORDED = 512  # the measured runs' latest verifications kept in the result, for lesson 10's plot


def _spec_counts(engine) -> tuple[int, int, int]:
    stats = getattr(engine, "spec_stats", None)
    return (0, 0, 0) if stats is None else (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)


def _speculation_record(engine, before: tuple[int, int, int]) -> dict | None:
    """What speculation did during the measured runs (None: the engine did not speculate),
    with their latest ``HISTORY_RECORDED`` verifications as ``[step, guesses, accepted]``."""
    drafts, guesses, accepted = (now - then for now, then in zip(_spec_counts(engine), before))
    if not drafts:
        return None
    history = list(engine.spec_stats.history)[-min(drafts, HISTORY_RECORDED):]
    return {"num_drafts": drafts, "num_draft_tokens": guesses, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / guesses, "mean_acceptance_length": 1 + accepted / drafts,
            "history": [list(entry) for entry in history]}
