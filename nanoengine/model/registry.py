"""Which class implements which Hugging Face architecture: one line per architecture."""

from __future__ import annotations

import importlib

from transformers import PretrainedConfig

# HF architecture name -> (module under nanoengine.model, class name)
_ARCHITECTURES = {
    "BertModel": ("bert", "BertModel"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen", "Qwen2ForCausalLM"),
    "Qwen2MoeForCausalLM": ("mixtral", "Qwen2MoeForCausalLM"),
    "Qwen3ForCausalLM": ("qwen", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class_for(config: PretrainedConfig) -> type:
    """The nanoengine class for the config's first listed architecture."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in _ARCHITECTURES:
            module_name, class_name = _ARCHITECTURES[arch]
            module = importlib.import_module(f"nanoengine.model.{module_name}")
            return getattr(module, class_name)
    raise ValueError(
        f"architecture {getattr(config, 'architectures', None)} is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )
