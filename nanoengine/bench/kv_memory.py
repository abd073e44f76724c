"""``nanoengine bench kv-memory``: how many requests a KV budget holds, contiguous vs paged.

No model runs: this measures the allocators. Requests with realistic prompt and output
lengths (fixed seed) are admitted in order until the budget is spent, each at its final
length (the peak it reaches). The contiguous cache must reserve ``max_model_len`` tokens
per request up front, since it cannot know how long a request will grow; the paged cache
(lesson 03's real ``KVCacheManager``) takes blocks only for tokens that exist. Waste is the
share of reserved slots that hold no token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoengine.bench.common import write_result
from nanoengine.bench.datasets import realistic_lengths
from nanoengine.cache.contiguous import contiguous_requests_that_fit, kv_bytes_per_token
from nanoengine.cache.kv_cache_manager import KVCacheManager, num_blocks_for_budget
from nanoengine.config import parse_size
from nanoengine.model import load_hf_config
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import max_model_len_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kv-memory", help="requests that fit in a KV budget: contiguous vs paged")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="the KV budget (bytes, or 512MiB, 1GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per K/V element (2 for bf16)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=2000, help="requests offered (more than fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def _usage(fit: int, reserved_tokens: int, used_tokens: int) -> dict:
    return {"requests_fit": fit, "reserved_tokens": reserved_tokens, "used_tokens": used_tokens,
            "waste_share": 1 - used_tokens / reserved_tokens if reserved_tokens else 0.0}


def measure(budget: int, block_size: int, bytes_per_token: int, max_model_len: int, lengths: list[tuple[int, int]]) -> dict:
    """Admit requests in order into each cache until the budget is full; count what each holds."""
    totals = [p + o for p, o in lengths]
    fit = min(len(totals), contiguous_requests_that_fit(budget, bytes_per_token, max_model_len))
    contiguous = _usage(fit, fit * max_model_len, sum(totals[:fit]))
    manager = KVCacheManager(num_blocks_for_budget(budget, bytes_per_token, block_size), block_size)
    admitted = 0
    for i, total in enumerate(totals):
        if not manager.allocate_slots(str(i), range(total)):
            break
        admitted += 1
    held_blocks = manager.pool.num_blocks - manager.num_free_blocks
    paged = _usage(admitted, held_blocks * block_size, sum(totals[:admitted]))
    return {"contiguous": contiguous, "paged": paged}


def main(args: argparse.Namespace) -> int:
    config = load_hf_config(args.model)
    max_model_len = max_model_len_for(config, args.max_model_len)
    bytes_per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config),
                                         args.dtype_bytes)
    budget = parse_size(args.kv_cache_memory)
    lengths = realistic_lengths(args.num_requests, max_model_len, args.seed)
    result = {
        "model": config.architectures[0] if args.model is None else str(args.model),
        "budget_bytes": budget,
        "block_size": args.block_size,
        "bytes_per_token": bytes_per_token,
        "max_model_len": max_model_len,
        "num_requests_offered": len(lengths),
        **measure(budget, args.block_size, bytes_per_token, max_model_len, lengths),
    }
    if args.model is None:
        result["model"] = "SmolLM2-135M-Instruct"
    print(f"KV budget {budget / 2**30:.2f} GiB, {bytes_per_token} bytes/token, max_model_len {max_model_len}, "
          f"block size {args.block_size}")
    for name in ("contiguous", "paged"):
        r = result[name]
        print(f"{name:>10}: {r['requests_fit']:5d} requests at once, {r['used_tokens']:8d} tokens stored in "
              f"{r['reserved_tokens']:8d} reserved slots, waste {100 * r['waste_share']:.1f}%")
    write_result(args.result_json, result)
    return 0
