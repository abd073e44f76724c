"""Test-only writers of GPTQ and AWQ checkpoints, and of the float model each one stands for.

Written apart from nanoengine's unpacking (nibbles shifted into words one position at a
time, following AutoGPTQ's v1 and AutoAWQ's GEMM packing), so loading these files checks the
library against the formats rather than against itself.

Every q/k/v/o/gate/up/down weight is quantized group-wise to 4 bits with an integer zero point
(asymmetric: the group's range split in 15 steps) and fp16 scales. The oracle is the same
transformers model with those weights replaced by exactly what the codes decode to, so a
correct loader reproduces its logits up to float rounding.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output AWQ_ORDER[j] of its eight
# layers that read the same input as another (GPTQ quantizes them in the same act order)
SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def quantize_groups(
    weight: torch.Tensor, g_idx: torch.Tensor, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [N, K]``, each input's group ``g_idx [K]`` -> (codes ``[N, K]``, zeros ``[G, N]``
    in ``min_zero``..15, fp16 scales ``[G, N]``, the float32 weight they decode to ``[N, K]``)."""
    n, k = weight.shape
    groups = int(g_idx.max()) + 1
    codes = torch.empty(n, k, dtype=torch.int64)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    scales = torch.empty(groups, n, dtype=torch.float16)
    decoded = torch.empty(n, k)
    for g in range(groups):
        cols = g_idx == g
        w = weight[:, cols].float()
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = ((hi - lo) / 15).clamp(min=1e-4).half()
        zero = torch.round(-lo / scale.float()).clamp(min_zero, 15).long()
        q = torch.round(w / scale.float()[:, None] + zero[:, None]).clamp(0, 15).long()
        codes[:, cols], zeros[g], scales[g] = q, zero, scale
        decoded[:, cols] = (q - zero[:, None]).float() * scale.float()[:, None]
    return codes, zeros, scales, decoded


def pack_along(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Integer values in 0..15 -> int32 words, eight values along ``dim`` per word: nibble
    ``j`` of word ``i`` holds value ``8 * i + order[j]``."""
    values = values.movedim(dim, 0).long()
    words = torch.zeros(values.shape[0] // 8, *values.shape[1:], dtype=torch.int64)
    for j, position in enumerate(order):
        words |= values[position::8] << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, read as int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def gptq_g_idx(input_size: int, group_size: int, desc_act: bool, seed: int) -> torch.Tensor:
    """Inputs' groups in order, or, for act order, each group's inputs scattered at random."""
    in_order = torch.arange(input_size) // group_size
    if not desc_act:
        return in_order
    g_idx = torch.empty(input_size, dtype=torch.int64)
    g_idx[torch.randperm(input_size, generator=torch.Generator().manual_seed(seed))] = in_order
    return g_idx


def gptq_tensors(weight: torch.Tensor, group_size: int, desc_act: bool, seed: int = 0):
    """One layer's GPTQ v1 tensors (zeros stored minus one, so never 0) and its decoded weight."""
    k = weight.shape[1]
    g_idx = gptq_g_idx(k, k if group_size == -1 else group_size, desc_act, seed)
    codes, zeros, scales, decoded = quantize_groups(weight, g_idx, min_zero=1)
    tensors = {
        "qweight": pack_along(codes.t(), dim=0),
        "qzeros": pack_along(zeros - 1, dim=1),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, decoded


def awq_tensors(weight: torch.Tensor, group_size: int):
    """One layer's AWQ GEMM tensors and its decoded weight."""
    g_idx = torch.arange(weight.shape[1]) // group_size
    codes, zeros, scales, decoded = quantize_groups(weight, g_idx, min_zero=0)
    tensors = {
        "qweight": pack_along(codes.t(), dim=1, order=AWQ_ORDER),
        "qzeros": pack_along(zeros, dim=1, order=AWQ_ORDER),
        "scales": scales,
    }
    return tensors, decoded


def write_quantized(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    quantization_config: dict,
    keep_float: tuple[str, ...] = (),
) -> PreTrainedModel:
    """Save ``model`` as a GPTQ or AWQ checkpoint at ``path`` (the method, group size and
    ``desc_act`` read from ``quantization_config``); returns the oracle: a copy of ``model``
    whose quantized weights are what the checkpoint decodes to. Linear layers whose name
    contains one of ``keep_float`` stay float (AWQ's ``modules_to_not_convert``)."""
    method, group_size = quantization_config["quant_method"], quantization_config["group_size"]
    oracle = copy.deepcopy(model)
    oracle_params = dict(oracle.named_parameters())
    tensors = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        quantize = leaf == "weight" and module.endswith(LINEAR_NAMES) and not any(s in module for s in keep_float)
        if not quantize:
            tensors[name] = tensor.clone().contiguous()
            continue
        if method == "gptq":
            head, _, kind = module.rpartition(".")
            seed = zlib.crc32(f"{head}.{SAME_INPUT_AS.get(kind, kind)}".encode())
            packed, decoded = gptq_tensors(tensor, group_size, quantization_config["desc_act"], seed)
        else:
            packed, decoded = awq_tensors(tensor, group_size)
        tensors.update({f"{module}.{key}": value for key, value in packed.items()})
        with torch.no_grad():
            oracle_params[name].copy_(decoded)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return oracle.eval()
