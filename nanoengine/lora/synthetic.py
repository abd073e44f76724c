"""Random LoRA adapters in PEFT's file format, for benchmarks and the lesson's notebook.

No model hub is reachable from the course machines, so adapters to measure with are made
here: for every decoder layer and every projection named in ``target_modules``, an ``A``
and a ``B`` drawn at random (B non-zero, unlike a freshly initialised PEFT adapter, so
the adapter changes the model's output). PEFT reads the files back
(``PeftModel.from_pretrained``), which the tests check.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from nanoengine.lora.adapter import ATTENTION_MODULES, SUPPORTED_MODULES, projection_shapes


def write_random_adapter(
    config: PretrainedConfig, path: str | Path, rank: int = 8, lora_alpha: float = 16.0,
    target_modules: Sequence[str] = SUPPORTED_MODULES, seed: int = 0, std: float = 0.02,
) -> Path:
    """Write a random rank-``rank`` adapter for a model with ``config`` into directory ``path``."""
    unknown = sorted(set(target_modules) - set(SUPPORTED_MODULES))
    if unknown:
        raise ValueError(f"target_modules {unknown} are not projections nanoengine adapts ({', '.join(SUPPORTED_MODULES)})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in target_modules:
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = std * torch.randn(out_features, rank, generator=generator)
    save_file(tensors, path / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
        "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return path
