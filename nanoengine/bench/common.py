"""What the ``nanoengine bench`` commands share: the workload flags and the requests they
describe, building the engine from its flags, and writing the result record."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any


from nanoengine.bench.datasets import load_jsonl_dataset, random_lengths, random_token_prompts
from nanoengine.bench.machine import describe_machine
from nanoengine.config import parse_size, speculative_config_flag
from nanoengine.lora.arguments import add_lora_arguments
from nanoengine.lora.request import LoRARequest
from nanoengine.quant.registry import quantization_methods

# flag (argparse dest) -> LLM keyword; a command passes those of its flags that it has, so a
# new engine option is one line here and one add_argument in each command that offers it
_ENGINE_FLAGS = {
    "dtype": "dtype",
    "seed": "seed",
    "block_size": "block_size",
    "kv_cache_memory": "kv_cache_memory_bytes",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "enable_prefix_caching": "enable_prefix_caching",
    "fast_path": "fast_path",
    "enforce_eager": "enforce_eager",
    "batch_invariant": "batch_invariant",
    "speculative_config": "speculative_config",
    "quantization": "quantization",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "distributed_executor_backend": "distributed_executor_backend",
    "enable_lora": "enable_lora",
    "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank",
}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags of vLLM's random and custom datasets, which :func:`workload` reads."""
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128, help="also for dataset lines without output_len")
    p.add_argument("--range-ratio", type=float, default=0.0, help="spread lengths uniformly by ± this share")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="random ids every prompt starts with (a shared system prompt)")
    p.add_argument("--dataset-path", type=Path, default=None,
                   help='JSONL of {"prompt": text} or {"prompt_token_ids": [...]}, optional "output_len"; '
                        "replaces the random prompts (the same ones in every iteration)")


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    """``--profile PATH``: the measured runs under ``torch.profiler`` (:mod:`nanoengine.bench.profile`)."""
    p.add_argument("--profile", type=Path, default=None, metavar="PATH",
                   help="profile the measured runs: Chrome trace to PATH, and a table of where the time went")


def add_quantization_arg(p: argparse.ArgumentParser) -> None:
    """``--quantization METHOD``, as ``vllm serve`` spells it (lesson 11)."""
    p.add_argument("--quantization", "-q", choices=quantization_methods(), default=None,
                   help="quantized weights: int8/int4/fp8 on the fly, gguf runs a GGUF's own blocks "
                        "(gptq/awq checkpoints are detected)")


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    """``--speculative-config JSON``, as ``vllm bench`` and ``nanoengine serve`` take it (lesson 10)."""
    p.add_argument("--speculative-config", type=speculative_config_flag, default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """Lesson 14's flags: how many different adapters the requests use, round-robin."""
    add_lora_arguments(p)
    p.add_argument("--num-loras", type=int, default=0, metavar="N",
                   help="request i runs adapter i %% N (implies --enable-lora; 0: the base model)")
    p.add_argument("--lora-path", type=Path, default=None,
                   help="a PEFT adapter served under all N ids (default: N random adapters of --max-lora-rank)")


def benchmark_loras(args: argparse.Namespace, config, directory: Path) -> list[LoRARequest]:
    """The ``--num-loras`` adapters the requests cycle through: ``--lora-path`` under N ids, or
    N random adapters of rank ``--max-lora-rank`` written into ``directory``."""
    from nanoengine.lora.synthetic import write_random_adapter  # torch: loaded only when a bench runs

    paths = [args.lora_path or write_random_adapter(config, directory / f"adapter{i}", rank=args.max_lora_rank,
                                                    lora_alpha=2 * args.max_lora_rank, seed=i)
             for i in range(args.num_loras)]
    return [LoRARequest(f"adapter{i}", i + 1, str(path)) for i, path in enumerate(paths)]


def workload(args: argparse.Namespace, vocab_size: int, iteration: int) -> list[tuple[str | list[int], int]]:
    """(prompt, output length) of every request of one iteration: the first ``--num-prompts``
    lines of the dataset, or random prompts drawn anew from ``seed + 1000 * iteration`` so a
    prefix cache never serves one iteration from an earlier one."""
    if args.dataset_path:
        lines = load_jsonl_dataset(args.dataset_path)[: args.num_prompts]
        return [(r.prompt, r.output_len or args.output_len) for r in lines]
    seed = args.seed + 1000 * iteration
    lengths = random_lengths(args.num_prompts, args.input_len, args.output_len, args.range_ratio, seed)
    prompts = random_token_prompts([p for p, _ in lengths], vocab_size, seed, args.prefix_len)
    return [(prompt, o) for prompt, (_, o) in zip(prompts, lengths)]


def describe_workload(args: argparse.Namespace) -> str:
    """The workload in words, for the report's first line."""
    if args.dataset_path:
        return f"dataset {args.dataset_path}, output {args.output_len} unless the line says"
    return (f"input {args.input_len} (+ shared prefix {args.prefix_len}), output {args.output_len}, "
            f"range ratio {args.range_ratio}")


def workload_record(args: argparse.Namespace, num_requests: int) -> dict[str, Any]:
    """The workload's fields of a result record."""
    return {"num_prompts": num_requests, "input_len": None if args.dataset_path else args.input_len,
            "output_len": args.output_len, "range_ratio": args.range_ratio, "prefix_len": args.prefix_len,
            "dataset_path": str(args.dataset_path) if args.dataset_path else None}


def engine_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """``LLM`` keyword arguments from a bench command's flags; a flag the command lacks, or left
    at None, keeps ``LLM``'s default. ``overrides`` win (prefix-cache sets its own caching)."""
    kwargs = {keyword: getattr(args, flag) for flag, keyword in _ENGINE_FLAGS.items()
              if getattr(args, flag, None) is not None}
    if "kv_cache_memory_bytes" in kwargs:
        kwargs["kv_cache_memory_bytes"] = parse_size(kwargs["kv_cache_memory_bytes"])
    return {**kwargs, **overrides}


def write_result(path: Path | None, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON to ``path`` (nothing when None), after the command line, the
    date and the machine, so every recorded figure says how and where it was measured."""
    if path is None:
        return
    header = {"command": "nanoengine bench " + " ".join(sys.argv[2:]), "date": datetime.date.today().isoformat(),
              "machine": describe_machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, **record}, indent=1) + "\n")
