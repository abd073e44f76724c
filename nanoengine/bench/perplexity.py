"""``nanoengine bench perplexity``: what a precision or a quantization method costs in quality.

The model reads a fixed text (``--text``; the course ships ``tests/data/perplexity.txt``) in
windows of ``--window`` tokens and we ask the engine for the log-probability of every token
given the ones before it (``prompt_logprobs=0``, the path vLLM's users score text with).
Perplexity is ``exp(-mean log p)``: the number of equally likely tokens the model hesitates
between, on average; a quantized model is as good as its float self when it is unchanged.
The record also has the weights' resident bytes, the other side of the trade.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from nanoengine.bench.common import add_quantization_arg, engine_kwargs, write_result
from nanoengine.config import add_fast_path_arg
from nanoengine.platform import dtype_name
from nanoengine.sampling_params import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("perplexity", help="perplexity of a fixed text, and the weights' memory (lesson 11)")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--text", type=Path, required=True, help="a UTF-8 text file (the course's: tests/data/perplexity.txt)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window (each starts afresh)")
    p.add_argument("--dtype", default="auto")
    add_quantization_arg(p)
    add_fast_path_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=None)
    p.set_defaults(func=main)


def token_logprobs(llm, token_ids: Sequence[int], window: int) -> list[float]:
    """``log p(token | earlier tokens of its window)`` for every token but each window's first."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens; got {window}")
    windows = [list(token_ids[i : i + window]) for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    return [
        entries[token].logprob
        for w, out in zip(windows, outputs)
        for token, entries in zip(w[1:], out.prompt_logprobs[1:])
    ]


def perplexity(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def main(args: argparse.Namespace) -> int:
    from nanoengine import LLM

    text = args.text.read_text(encoding="utf-8")
    llm = LLM(args.model, **engine_kwargs(args, enable_prefix_caching=False))
    loaded = llm.loaded
    token_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    window = min(args.window, loaded.max_model_len)
    logprobs = token_logprobs(llm, token_ids, window)
    value = perplexity(logprobs)
    print(f"model={loaded.path.name} dtype={dtype_name(loaded.dtype)} quantization={loaded.quantization} "
          f"weights={loaded.weight_bytes / 1e6:.1f} MB", file=sys.stderr)
    print(f"perplexity {value:.3f} over {len(logprobs)} tokens of {args.text.name} (windows of {window})")
    write_result(args.result_json, {
        "model": loaded.path.name,
        "dtype": dtype_name(loaded.dtype),
        "quantization": loaded.quantization,
        "weight_bytes": loaded.weight_bytes,
        "text": args.text.name,
        "window": window,
        "num_scored_tokens": len(logprobs),
        "perplexity": value,
        "mean_logprob": sum(logprobs) / len(logprobs),
    })
    return 0
