"""PEFT adapters on the tiny zoo, for lesson 14's tests: made by ``peft`` itself, with random,
non-zero B (a fresh PEFT adapter is a no-op), and the merged models that are their oracles."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (target modules, rank, alpha, rsLoRA): different shapes of adapter, one per id
ADAPTERS = {
    1: (["q_proj", "v_proj"], 4, 8, False),
    2: (ALL_MODULES, 8, 16, False),
    3: (["up_proj", "down_proj", "o_proj"], 6, 4, True),
}


def make_peft_adapter(base: Path, out: Path, target_modules: list[str], rank: int, alpha: float,
                      use_rslora: bool = False, seed: int = 0, b_std: float = 0.3) -> Path:
    """Save a PEFT LoRA adapter of ``base`` with random A and B (B drawn with ``b_std``, so
    the adapter visibly changes the greedy tokens without drowning the base model)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


@functools.cache
def merged_model(base: Path, adapter: Path | None) -> torch.nn.Module:
    """transformers' model with PEFT's adapter merged into its weights (None: the base model)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def broken_copy(adapter_dir: str | Path, tmp_path: Path, edit: Callable[[Path], object]) -> str:
    """A copy of an adapter, spoiled by ``edit`` (given the copy's directory)."""
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    edit(broken)
    return str(broken)


def set_config(**changes) -> Callable[[Path], None]:
    """An ``edit`` for :func:`broken_copy`: these entries changed in ``adapter_config.json``."""
    def edit(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit
