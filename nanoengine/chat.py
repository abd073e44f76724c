"""``nanoengine chat``: talk to a model in the terminal, each reply streamed as it is generated.

The conversation is rendered with the model's chat template every turn, and the reply is
read from the async engine's stream (lesson 13), printing each new piece of text as soon as
the engine produces it. ``/reset`` starts over, ``/exit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from nanoengine.config import add_fast_path_arg
from nanoengine.engine.async_engine import AsyncEngine
from nanoengine.engine.inputs import Prompt, render_chat
from nanoengine.quant.registry import quantization_methods
from nanoengine.sampling_params import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="a terminal chat with a model, replies streamed")
    p.add_argument("model", nargs="?", default=None, help="bundled name, HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_fast_path_arg(p)
    p.add_argument("--quantization", "-q", choices=quantization_methods(), default=None,
                   help="quantized weights (lesson 11); gguf runs a GGUF's own blocks")
    p.set_defaults(func=main)


async def _reply(engine: AsyncEngine, token_ids: list[int], params: SamplingParams, request_id: str) -> str:
    """Stream one reply to stdout; return its text."""
    printed = ""
    async for out in engine.generate(Prompt(None, token_ids), params, request_id):
        text = out.outputs[0].text
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return printed


def main(args: argparse.Namespace) -> int:
    engine = AsyncEngine.start(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                               fast_path=args.fast_path, enforce_eager=args.enforce_eager, batch_invariant=args.batch_invariant,
                               quantization=args.quantization)
    tokenizer, max_len = engine.info.tokenizer, engine.info.max_model_len
    system = [{"role": "system", "content": args.system}] if args.system else []
    conversation = list(system)
    print(f"chatting with {engine.info.model_name}; /reset starts over, /exit leaves")
    try:
        for turn in range(sys.maxsize):
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                conversation = list(system)
                continue
            if not line:
                continue
            conversation.append({"role": "user", "content": line})
            token_ids = render_chat(tokenizer, conversation).token_ids
            if len(token_ids) >= max_len:
                print(f"(the conversation is {len(token_ids)} tokens, the context {max_len}: /reset to go on)")
                conversation.pop()
                continue
            params = SamplingParams(temperature=args.temperature, max_tokens=min(args.max_tokens, max_len - len(token_ids)))
            sys.stdout.write("model> ")
            conversation.append({"role": "assistant", "content": asyncio.run(_reply(engine, token_ids, params, f"chat-{turn}"))})
    finally:
        engine.shutdown()
    return 0
