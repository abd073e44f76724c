"""``nanoengine bench throughput``: an offline batch through ``LLM.generate``, shaped like vLLM's.

Random-token prompts (fixed seed) of ``--input-len`` and outputs of ``--output-len``
(``ignore_eos``, so every request generates exactly its length), both spread by
``--range-ratio``, each prompt after a ``--prefix-len``-token prefix they all share; or the
first ``--num-prompts`` lines of a JSONL ``--dataset-path``. Reports requests/s, total and
output tokens/s, and per-request time to first token (TTFT) and time per output token
(TPOT), medians of ``--num-iters`` runs. Random prompts are drawn anew for every run, so
the prefix cache never serves one run from an earlier one; a dataset's prompts repeat, so
measure it with ``--num-iters 1`` or ``--no-enable-prefix-caching``.

``--num-loras N`` (lesson 14) runs request ``i`` with adapter ``i % N``: N random adapters
of rank ``--max-lora-rank`` (or ``--lora-path`` under N ids), up to ``--max-loras`` of them
in one step.

``--static-batching`` runs the same engine the way engines did before continuous batching:
requests go in waves of ``max_num_seqs`` and a wave starts only when the previous one has
finished, so a short request's slot idles until the longest of its wave is done.
``--backend hf`` runs the same prompts through Hugging Face ``generate`` instead
(:mod:`nanoengine.bench.hf_backend`); it does not stream, so it reports no TTFT or TPOT.
``--profile PATH`` runs the timed runs under ``torch.profiler`` and says where the time
went, per engine step too (:mod:`nanoengine.bench.profile`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from nanoengine.bench.common import (
    add_lora_args, add_profile_arg, add_quantization_arg, add_workload_args, benchmark_loras,
    describe_workload, engine_kwargs, workload, workload_record, write_result,
)
from nanoengine.bench.hf_backend import hf_generate, load_hf_model
from nanoengine.bench.profile import BenchProfiler
from nanoengine.bench.stats import format_summary, summary
from nanoengine.config import add_fast_path_arg
from nanoengine.model.loader import resolve_model_path
from nanoengine.outputs import RequestOutput
from nanoengine.parallel.launch import add_parallel_arguments
from nanoengine.platform import dtype_name
from nanoengine.sampling_params import SamplingParams

# (prompt token ids, output length) of one request
Requests = list[tuple[list[int], int]]

# a run's figures, as (key, label, unit), in the order they are printed
_REPORTED = (("requests_per_s", "throughput", "requests/s"), ("total_tokens_per_s", "total", "tokens/s"),
             ("output_tokens_per_s", "output", "tokens/s"), ("ttft_p50_s", "TTFT p50", "s"),
             ("tpot_p50_ms", "TPOT p50", "ms"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("throughput", help="offline batch throughput, TTFT and TPOT")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--backend", choices=["nanoengine", "hf"], default="nanoengine",
                   help="hf: Hugging Face transformers generate on the same prompts, the baseline")
    p.add_argument("--hf-max-batch-size", type=int, default=32, help="requests per generate call (hf only)")
    add_workload_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--kv-cache-memory", default=None, help="KV budget (bytes, or 512MiB, 1GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--static-batching", action="store_true", help="waves of max_num_seqs, each waiting for the last")
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    add_fast_path_arg(p)
    add_quantization_arg(p)
    add_parallel_arguments(p)
    add_lora_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    add_profile_arg(p)
    p.set_defaults(func=main)


def _tokenized(args: argparse.Namespace, tokenizer, vocab_size: int, iteration: int) -> Requests:
    """One run's requests, a dataset's text prompts tokenized as the engine would."""
    requests = workload(args, vocab_size, iteration)
    return [(tokenizer(p)["input_ids"] if isinstance(p, str) else p, o) for p, o in requests]


def _rates(requests: Requests, elapsed: float) -> dict[str, float]:
    """Requests/s and tokens/s of a run, counting each request's real prompt length."""
    output_tokens = sum(o for _, o in requests)
    return {
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "total_tokens_per_s": (sum(len(p) for p, _ in requests) + output_tokens) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
    }


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


class _NanoengineBackend:
    """``LLM.generate`` over the whole batch, or over waves of ``max_num_seqs`` (static batching)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from nanoengine import LLM

        if args.num_loras < 0:
            raise ValueError(f"--num-loras must be at least 0; got {args.num_loras}")
        self.llm = LLM(args.model, **engine_kwargs(args, enable_lora=args.enable_lora or args.num_loras > 0))
        self.adapter_dir = tempfile.TemporaryDirectory(prefix="nanoengine-loras-")
        self.loras = benchmark_loras(args, self.llm.loaded.hf_config, Path(self.adapter_dir.name))
        self.tokenizer, self.vocab_size = self.llm.get_tokenizer(), self.llm.loaded.hf_config.vocab_size
        self.static_batching, self.max_num_seqs = args.static_batching, args.max_num_seqs

    def run(self, requests: Requests, use_tqdm: bool = True) -> dict[str, float]:
        prompts = [{"prompt_token_ids": p} for p, _ in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, detokenize=False) for _, o in requests]
        loras = [self.loras[i % len(self.loras)] if self.loras else None for i in range(len(prompts))]
        wave = self.max_num_seqs if self.static_batching else len(prompts)
        started = time.monotonic()
        outputs = []
        for w in range(0, len(prompts), wave):
            outputs += self.llm.generate(prompts[w : w + wave], params[w : w + wave], use_tqdm=use_tqdm,
                                         lora_request=loras[w : w + wave])
        ttft, tpot = _per_request(outputs, started)
        return {**_rates(requests, time.monotonic() - started), "ttft_p50_s": statistics.median(ttft),
                "tpot_p50_ms": statistics.median(tpot) * 1e3 if tpot else 0.0}

    def num_steps(self) -> int:
        """Engine steps taken so far (the scheduler counts them)."""
        return self.llm.llm_engine.scheduler.step

    def close(self) -> None:
        """Stop the engine's other ranks (tensor/pipeline parallelism); drop generated adapters."""
        self.llm.shutdown()
        self.adapter_dir.cleanup()

    def record(self) -> dict:
        scheduler = self.llm.llm_engine.scheduler
        return {"model": self.llm.loaded.path.name, "dtype": dtype_name(self.llm.loaded.dtype),
                "mode": "static batching" if self.static_batching else "continuous batching",
                "tensor_parallel_size": self.llm.loaded.layout.tp.size,
                "pipeline_parallel_size": self.llm.loaded.layout.pp.size,
                "max_num_seqs": self.max_num_seqs, "token_budget": scheduler.token_budget,
                "preemptions": scheduler.num_preemptions,
                "prefix_cache_hit_blocks": self.llm.llm_engine.kv_cache_manager.stats.hit_blocks,
                "num_loras": len(self.loras),
                **({"max_loras": self.llm.llm_engine.scheduler.max_loras,
                    "max_lora_rank": self.llm.llm_engine.runner.lora.config.max_lora_rank} if self.loras else {})}


class _HfBackend:
    """Hugging Face ``generate`` in batches of ``--hf-max-batch-size``, in request order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.path = resolve_model_path(args.model)
        self.model, self.tokenizer = load_hf_model(self.path, args.dtype)
        self.vocab_size, self.max_batch_size = self.model.config.vocab_size, args.hf_max_batch_size
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)

    def run(self, requests: Requests, use_tqdm: bool = True) -> dict[str, float]:
        started = time.monotonic()
        with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm) as bar:
            hf_generate(self.model, requests, self.max_batch_size, self.pad_id, bar.update)
        return _rates(requests, time.monotonic() - started)

    def num_steps(self) -> None:
        """``generate`` takes no steps the bench can count."""
        return None

    def close(self) -> None:
        """Nothing runs beside this process."""

    def record(self) -> dict:
        return {"model": self.path.name, "dtype": dtype_name(self.model.dtype),
                "mode": "static batching", "hf_max_batch_size": self.max_batch_size}


def main(args: argparse.Namespace) -> int:
    backend = _NanoengineBackend(args) if args.backend == "nanoengine" else _HfBackend(args)
    # warm-up on prompts no run uses (a negative iteration would not do: Random(-s) is Random(s))
    backend.run(_tokenized(args, backend.tokenizer, backend.vocab_size, args.num_iters)[:2], use_tqdm=False)
    runs, requests = [], []
    iterations = [_tokenized(args, backend.tokenizer, backend.vocab_size, i) for i in range(args.num_iters)]
    profiler, steps_before = BenchProfiler(args.profile), backend.num_steps()
    with profiler:  # the timed runs, not the warm-up
        for i, requests in enumerate(iterations):
            runs.append(backend.run(requests))
            print(f"iteration {i + 1}/{args.num_iters}: {runs[-1]['elapsed_s']:.1f} s", file=sys.stderr)
    steps = None if steps_before is None else backend.num_steps() - steps_before
    described = backend.record()
    backend.close()
    print(f"{args.backend}, {described['mode']}: {len(requests)} requests, {describe_workload(args)}; "
          + ", ".join(f"{k} {v}" for k, v in described.items() if k not in ("model", "dtype", "mode")))
    for key, label, unit in _REPORTED:
        if key in runs[0]:
            print(format_summary(label, [r[key] for r in runs], unit))
    profile = profiler.report(steps)
    write_result(args.result_json, {
        **described, "backend": args.backend, **workload_record(args, len(requests)),
        **{k: summary([r[k] for r in runs]) for k in runs[0]},
        **({"profile": profile} if profile else {}),
    })
    return 0
