"""vLLM's LoRA flags, shared by ``nanoengine serve`` and ``nanoengine bench``."""

from __future__ import annotations

import argparse


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """``--enable-lora``, ``--max-loras`` and ``--max-lora-rank`` (lesson 14)."""
    parser.add_argument("--enable-lora", action="store_true",
                        help="let requests run with LoRA adapters (lesson 14)")
    parser.add_argument("--max-loras", type=int, default=4, metavar="N",
                        help="most adapters in one engine step (default: %(default)s)")
    parser.add_argument("--max-lora-rank", type=int, default=16, metavar="R",
                        help="largest adapter rank accepted (default: %(default)s)")


def lora_kwargs(args: argparse.Namespace) -> dict:
    """``LLM``'s LoRA arguments from the flags."""
    return dict(enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
