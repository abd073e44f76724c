"""``nanoengine serve``: start the engine process, then serve the OpenAI API with uvicorn.

The engine loads first (and logs its KV cache capacity), then the ``--lora-modules``
adapters, so a bad flag, model or adapter fails before any port is opened (so does an
embedding model with data parallelism, LoRA or speculative decoding: the engine refuses
them); the engine process is shut down however the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nanoengine.config import DTYPES, TASKS, add_fast_path_arg, parse_size, speculative_config_flag
from nanoengine.lora.arguments import add_lora_arguments, lora_kwargs
from nanoengine.parallel.launch import add_parallel_arguments, parallel_kwargs
from nanoengine.quant.registry import quantization_methods

if TYPE_CHECKING:
    from nanoengine.server.models import ServedModels

logger = logging.getLogger("nanoengine")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def lora_module_flag(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` item, ``NAME=PATH`` or vLLM's JSON ``{"name": ..., "path": ...}``,
    as ``(name, path)``."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text}") from None
        if not isinstance(item, dict) or set(item) != {"name", "path"}:
            raise argparse.ArgumentTypeError(f'a JSON item needs exactly "name" and "path": {text}')
        name, path = item["name"], item["path"]
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (or a JSON object), each non-empty: {text}")
    return name, path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``serve`` subcommand, with vLLM's flag names."""
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API (as `vllm serve`).")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    p.add_argument("--task", default="auto", choices=TASKS,
                   help="generate text, or embed it (POST /v1/embeddings, lesson 16); auto: encoders (BERT) embed")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--kv-cache-memory", type=_size, default=None, metavar="SIZE",
                        help="KV cache size: bytes or with a unit (512MiB, 1GiB)")
    memory.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                        help="share of the GPU's free memory for the KV cache (default 0.9)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of shared prompt prefixes")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="split long prompts across engine steps")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    add_fast_path_arg(p)
    p.add_argument("--quantization", "-q", choices=quantization_methods(), default=None,
                   help="quantized weights (lesson 11): int8/int4/fp8 on the fly, gguf runs a GGUF's own blocks; "
                        "gptq/awq checkpoints are detected")
    p.add_argument("--speculative-config", type=speculative_config_flag, default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (lesson 10)')
    add_parallel_arguments(p, data_parallel=True)
    add_lora_arguments(p)
    p.add_argument("--lora-modules", nargs="+", type=lora_module_flag, default=None, metavar="NAME=PATH",
                   help='LoRA adapters to serve from the start, each as NAME=PATH or {"name": ..., "path": ...}; '
                        "a request names one as its model (needs --enable-lora)")
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests in flight beyond which new ones get 503")
    p.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)
    return p


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``LLM``'s keyword arguments from the flags (left out where the flag was not given)."""
    kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed, block_size=args.block_size,
                  kv_cache_memory_bytes=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
                  enable_chunked_prefill=args.enable_chunked_prefill, fast_path=args.fast_path, enforce_eager=args.enforce_eager,
                  batch_invariant=args.batch_invariant,
                  speculative_config=args.speculative_config, quantization=args.quantization, task=args.task,
                  **parallel_kwargs(args), **lora_kwargs(args))
    if args.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


def _read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--chat-template: no such file: {path}")
    return file.read_text(encoding="utf-8")


async def _load_lora_modules(models: ServedModels, modules: list[tuple[str, str]]) -> None:
    """Serve the ``--lora-modules`` adapters, in order; the first that fails stops the server."""
    for name, path in modules:
        try:
            await models.load(name, path)
        except ValueError as exc:
            raise ValueError(f"--lora-modules {name}={path}: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit code."""
    import uvicorn

    from nanoengine.engine.async_engine import AsyncEngine
    from nanoengine.server.app import build_app

    chat_template = _read_chat_template(args.chat_template)
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be a positive integer; got {args.max_queued_requests}")
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be a positive integer; got {args.data_parallel_size}")
    if args.distributed_executor_backend == "torchrun":
        if args.data_parallel_size > 1:
            raise ValueError("--data-parallel-size spawns its replicas itself; it does not combine with torchrun")
        if int(os.environ.get("RANK", "0")) != 0:  # a worker rank: it serves the driver, not HTTP
            from nanoengine import LLM

            LLM(args.model, **engine_kwargs(args))  # works inside until the driver stops, then exits
    try:
        engine = AsyncEngine.start(args.model, data_parallel_size=args.data_parallel_size, **engine_kwargs(args))
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    try:
        app = build_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                        chat_template=chat_template, max_queued_requests=args.max_queued_requests)
        if args.lora_modules:
            asyncio.run(_load_lora_modules(app.state.context.models, args.lora_modules))
        host = f"[{args.host}]" if ":" in args.host else args.host
        logger.info("serving %s at http://%s:%d (OpenAI API under /v1)", app.state.context.model_name, host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
