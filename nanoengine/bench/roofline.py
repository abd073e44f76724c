"""Lesson 15: the roofline of this machine, the speed no engine can beat on it.

A decode step must read every weight once (one stream: bytes / memory bandwidth), and every
token costs about two FLOPs per weight it multiplies (a batch: FLOPs / matmul rate). The
slower of the two bounds the step. ``probe_machine`` measures the two rates here, with the
same PyTorch the engine uses, so the floors are this machine's, not a datasheet's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from transformers import PretrainedConfig

from nanoengine.model.llama import head_dim_of
from nanoengine.platform import dtype_name


@dataclasses.dataclass(frozen=True, slots=True)
class MachineRates:
    """Measured memory bandwidth (bytes/s, read + write of a large copy) and matmul rates (FLOP/s)."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float]


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001 (any callable)
    fn()  # warm-up: first-touch page faults, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_machine(copy_mib: int = 256, matmul_size: int = 2048, repeats: int = 5) -> MachineRates:
    """Time a large tensor copy and square matmuls in float32 and bfloat16 (medians)."""
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), repeats)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(matmul_size, matmul_size).to(dtype)
        b = torch.randn(matmul_size, matmul_size).to(dtype)
        seconds = _median_seconds(lambda: torch.mm(a, b), repeats)
        rates[dtype_name(dtype)] = 2 * matmul_size**3 / seconds
    return MachineRates(copy_bytes_per_s=2 * src.nbytes / copy_s, matmul_flops_per_s=rates)


def matmul_params(config: PretrainedConfig) -> int:
    """Weights a token is multiplied by in a forward: every layer's projections and the LM
    head (the embedding is a lookup, not a matmul)."""
    # BEGIN SOLUTION L15.T3
    head_dim = head_dim_of(config)
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    return config.num_hidden_layers * per_layer + config.vocab_size * hidden
    # END SOLUTION


def decode_floors(config: PretrainedConfig, dtype_bytes: int, rates: MachineRates, dtype: str) -> dict[str, float]:
    """Tokens/s ceilings of decode: one stream limited by reading the weights once per step,
    and a large batch limited by 2 FLOPs per weight per token at the measured matmul rate.

    A pure read streams about as many bytes per second as a copy moves (reads plus writes),
    so the copy's rate stands for the read bandwidth. Attention's reads of the KV cache are
    left out: beside the weights they are small for short sequences."""
    params = matmul_params(config)
    return {
        "single_stream_tokens_per_s": rates.copy_bytes_per_s / (params * dtype_bytes),
        "batched_tokens_per_s": rates.matmul_flops_per_s[dtype] / (2 * params),
    }
