"""What every quantization method provides: a config that hands each layer its method.

A :class:`QuantizationConfig` is built once per model, from the user's ``quantization=``
choice or the checkpoint's own ``quantization_config``, and asked for a
:class:`~nanoengine.model.layers.linear.LinearMethod` for every linear layer as the model is
constructed (``prefix`` is the layer's dotted name, for methods that skip some layers). The
vocabulary layers are left to the methods that store them quantized (GGUF); the others keep
the embedding and the LM head in the model's dtype, as vLLM does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from nanoengine.model.layers.linear import LinearMethod


class QuantizationConfig(ABC):
    """One quantization method's settings; ``name`` is what ``quantization=`` spells."""

    name: ClassVar[str]

    @classmethod
    def from_checkpoint_config(cls, quantization_config: dict[str, Any]) -> QuantizationConfig:
        """Read a checkpoint's ``quantization_config``; on-the-fly methods take defaults."""
        return cls()

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (``model.layers.0.self_attn.qkv_proj``)."""


def linear_method_for(quant_config: QuantizationConfig | None, prefix: str) -> LinearMethod | None:
    """``quant_config``'s method for a layer, or None (the plain float method)."""
    return quant_config.linear_method(prefix) if quant_config is not None else None
