"""Reading a PEFT LoRA adapter: ``adapter_config.json`` and ``adapter_model.safetensors``.

A LoRA adapter changes a projection ``y = W x`` into ``y = W x + s · B (A x)``: ``A`` is
``[r, in]``, ``B`` is ``[out, r]`` with a small rank ``r``, and ``s`` is PEFT's scaling,
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). PEFT saves each pair under the
name of the projection it adapts, ``base_model.model.model.layers.{i}.self_attn.q_proj
.lora_A.weight``; the loader folds ``s`` into ``B`` once, so applying it is two matmuls.

Everything an adapter could get wrong is checked here, when it is added, and named: a
missing file, an unsupported PEFT option, a module nanoengine cannot adapt, a shape that
does not fit the model, a rank above ``max_lora_rank``. A bad adapter is refused before
any request runs with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PretrainedConfig

from nanoengine.lora.request import LoRARequest
from nanoengine.model.llama import head_dim_of

# The projections an adapter may target, by their checkpoint names.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_MODULES = ATTENTION_MODULES + MLP_MODULES

_WEIGHT_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# PEFT options that change what the weights mean; an adapter using one is refused.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
}


@dataclasses.dataclass(slots=True)
class LoRAAdapter:
    """One adapter's weights on the CPU, ready to copy into a slot.

    Invariant: ``weights[(layer, module)]`` is ``(A [r, in], B [out, r])`` in float32 for a
    checkpoint projection name ``module`` of decoder layer ``layer``, with PEFT's scaling
    already multiplied into ``B``; ``r == rank`` for every pair.
    """

    lora_request: LoRARequest
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every projection an adapter may target."""
    head_dim = head_dim_of(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def read_adapter_config(path: Path) -> dict:
    """The adapter's ``adapter_config.json``, checked for what nanoengine can apply."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"LoRA adapter {str(path)!r}: adapter_config.json is not valid JSON ({exc.msg})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {str(path)!r} is a {config['peft_type']} adapter, not LoRA")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise ValueError(f"LoRA adapter {str(path)!r} uses {what}, which nanoengine does not apply")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(path)!r} trains biases (bias={config['bias']!r}); only 'none' is supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"LoRA adapter {str(path)!r}: adapter_config.json needs a positive {key!r}; got {value!r}")
    return config


def peft_scaling(config: dict) -> float:
    """PEFT's multiplier of ``B A x``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
    # BEGIN SOLUTION L14.T1
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    # END SOLUTION


def load_adapter(lora_request: LoRARequest, config: PretrainedConfig, max_lora_rank: int) -> LoRAAdapter:
    """Read and check the adapter at ``lora_request.lora_path`` for a model with ``config``."""
    path = Path(lora_request.lora_path)
    if not path.is_dir():
        raise ValueError(f"LoRA adapter {lora_request.lora_name!r}: {str(path)!r} is not a directory")
    adapter_config = read_adapter_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} has no adapter_model.safetensors")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"LoRA adapter {str(path)!r}: cannot read adapter_model.safetensors ({exc})") from None
    rank = int(adapter_config["r"])
    if rank > max_lora_rank:
        raise ValueError(f"LoRA adapter {lora_request.lora_name!r} has rank {rank}, above max_lora_rank "
                         f"({max_lora_rank}); start the engine with a larger max_lora_rank")
    pairs = _pair_up(tensors, str(path), config.num_hidden_layers)
    shapes = projection_shapes(config)
    scaling = peft_scaling(adapter_config)
    weights = {}
    for (layer, module), (a, b) in pairs.items():
        in_features, out_features = shapes[module]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ValueError(
                f"LoRA adapter {str(path)!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"this model needs A ({rank}, {in_features}) and B ({out_features}, {rank})")
        # BEGIN SOLUTION L14.T1
        weights[(layer, module)] = (a.float(), b.float() * scaling)
        # END SOLUTION
    if not weights:
        raise ValueError(f"LoRA adapter {str(path)!r} holds no LoRA weights")
    return LoRAAdapter(lora_request, rank, weights)


def _pair_up(tensors: dict[str, torch.Tensor], where: str, num_layers: int) -> dict[tuple[int, str], tuple]:
    """The file's tensors as ``(layer, module) -> (A, B)``; any other tensor is an error."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _WEIGHT_NAME.fullmatch(name)
        if match is None or match.group(2) not in SUPPORTED_MODULES:
            raise ValueError(f"LoRA adapter {where!r}: tensor {name!r} is not a LoRA weight of a projection "
                             f"nanoengine adapts ({', '.join(SUPPORTED_MODULES)})")
        layer = int(match.group(1))
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {where!r}: tensor {name!r} is for layer {layer}, "
                             f"but the model has {num_layers} layers")
        halves.setdefault((layer, match.group(2)), {})[match.group(3)] = tensor
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {where!r}: layer {layer} {module} has lora_{''.join(pair)} "
                             "but not its partner")
    return {key: (pair["A"], pair["B"]) for key, pair in halves.items()}
