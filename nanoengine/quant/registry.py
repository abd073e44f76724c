"""Which quantization method a model runs with: one registry line per method.

The choice comes from three places, checked against each other so a mismatch fails before
any weight is read: the checkpoint's ``quantization_config`` (GPTQ, AWQ: their tensors cannot
run any other way), the user's ``quantization=`` (``int8``/``int4``/``fp8`` quantize a float
checkpoint as it loads; ``gguf`` runs a GGUF file's blocks as they are), and the file format
(a GGUF file without ``quantization="gguf"`` is dequantized to ``dtype``, as lessons 00-10 ran it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module imports this one; the methods import the model layers
    from transformers import PretrainedConfig

    from nanoengine.quant.base import QuantizationConfig

# quantization= name -> (module under nanoengine.quant, config class, where the weights come from:
# "float" quantizes a float checkpoint as it loads, "checkpoint" reads a checkpoint quantized
# by that method, "gguf" runs a GGUF file's own blocks)
_METHODS = {
    "int8": ("int8", "Int8Config", "float"),
    "w8a8": ("w8a8", "W8A8Config", "float"),
    "int4": ("int4", "Int4Config", "float"),
    "fp8": ("fp8", "Fp8Config", "float"),
    "gptq": ("gptq", "GPTQConfig", "checkpoint"),
    "awq": ("awq", "AWQConfig", "checkpoint"),
    "gguf": ("gguf", "GGUFConfig", "gguf"),
}


def quantization_methods() -> list[str]:
    return list(_METHODS)


def check_quantization_name(name: str | None) -> None:
    """Refuse an unknown ``quantization=`` value, naming the known ones."""
    if name is not None and name not in _METHODS:
        raise ValueError(f"quantization must be one of {', '.join(_METHODS)} or None; got {name!r}")


def _config_class(name: str) -> type[QuantizationConfig]:
    module_name, class_name, _ = _METHODS[name]
    return getattr(importlib.import_module(f"nanoengine.quant.{module_name}"), class_name)


def resolve_quantization(
    requested: str | None, hf_config: PretrainedConfig, is_gguf: bool
) -> QuantizationConfig | None:
    """The method to build the model with, or None for plain float weights."""
    check_quantization_name(requested)
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None:
        checkpoint = checkpoint if isinstance(checkpoint, dict) else checkpoint.to_dict()
        method = checkpoint.get("quant_method")
        readable = [name for name, (_, _, source) in _METHODS.items() if source == "checkpoint"]
        if method not in readable:
            raise ValueError(
                f"the checkpoint is quantized with {method!r}, which nanoengine cannot read; "
                f"it reads {', '.join(readable)} checkpoints"
            )
        if requested not in (None, method):
            raise ValueError(f"the checkpoint is {method}-quantized; quantization={requested!r} cannot apply to it")
        return _config_class(method).from_checkpoint_config(checkpoint)
    if requested is None:
        return None
    source = _METHODS[requested][2]
    if source == "gguf" and not is_gguf:
        raise ValueError("quantization='gguf' runs a .gguf file's own block types; this model is not a GGUF file")
    if source == "checkpoint":
        raise ValueError(f"quantization={requested!r} reads {requested.upper()} checkpoints; this one has float weights")
    return _config_class(requested)()
