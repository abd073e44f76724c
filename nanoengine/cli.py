"""The ``nanoengine`` command: ``generate``, ``chat``, ``serve`` (lesson 13) and ``bench``."""

from __future__ import annotations

import argparse
import sys

from nanoengine import chat
from nanoengine.bench import kv_memory, latency, perplexity, prefix_cache, progression, serve, throughput
from nanoengine.server import launcher
from nanoengine.parallel.launch import add_parallel_arguments, parallel_kwargs
from nanoengine.quant.registry import quantization_methods


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="complete prompts offline and print the results")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quantization", "-q", choices=quantization_methods(), default=None,
                   help="quantized weights (lesson 11); gguf runs a GGUF's own blocks")
    p.add_argument("--lora-path", default=None, metavar="DIR", help="run every prompt with this PEFT LoRA adapter (lesson 14)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (default: %(default)s)")
    add_parallel_arguments(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from nanoengine import LLM, LoRARequest, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p)
    lora = LoRARequest("adapter", 1, args.lora_path) if args.lora_path else None
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              quantization=args.quantization, enable_lora=lora is not None, max_lora_rank=args.max_lora_rank,
              **parallel_kwargs(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, lora_request=lora)
    else:
        outputs = llm.generate(args.prompt, params, lora_request=lora)
    llm.shutdown()
    for prompt, out in zip(args.prompt, outputs):
        print(f"--- {prompt!r} ({out.outputs[0].finish_reason}, {len(out.outputs[0].token_ids)} tokens)")
        print(out.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoengine", description="vLLM rebuilt from scratch, as a course.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    chat.add_parser(sub)
    launcher.add_parser(sub)
    bench = sub.add_parser("bench", help="measure the engine (see docs/benchmarks.md)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    latency.add_parser(bench_commands)
    kv_memory.add_parser(bench_commands)
    throughput.add_parser(bench_commands)
    prefix_cache.add_parser(bench_commands)
    serve.add_parser(bench_commands)
    progression.add_parser(bench_commands)
    perplexity.add_parser(bench_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: say what is wrong, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
