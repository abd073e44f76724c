"""LLaVA: a vision tower, a projector and a language model (lesson 16: multimodal input).

An image becomes a run of tokens the language model reads like words. The processor puts
``image_seq_length`` copies of the ``<image>`` token in the prompt (one per image patch);
the vision tower (CLIP's ViT) turns the image into one vector per patch; the projector (two
linears and a GELU) maps each into the language model's embedding space; and those vectors
replace the ``<image>`` tokens' embeddings at the model's input. From there on the image
tokens are ordinary positions: their K/V go into the paged cache like text, chunked
prefill may split them, and the prefix cache may share them (keyed by the image's hash).

The vision tower is transformers' ``CLIPVisionModel``: it runs once per image, outside the
paged engine, so there is nothing for nanoengine to change in it. The language model is
nanoengine's own (the Llama family here).

Which rows of a step hold which image features is set per step by the model runner
(:meth:`set_image_rows`, like lesson 14's LoRA batch): the forward signature stays the one
every model has.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PretrainedConfig

from nanoengine.attention.base import AttentionContext
from nanoengine.model.llama import LlamaForCausalLM
from nanoengine.quant.base import QuantizationConfig

# Prefixes of the checkpoint's names, old (LLaVA 1.5 on the Hub) and new (transformers 5).
_LANGUAGE_PREFIXES = ("language_model.model.", "model.language_model.")
_LM_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
_VISION_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower.",
                    "vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


class LlavaProjector(nn.Module):
    """``linear_2(gelu(linear_1(x)))``: vision features into the language model's space."""

    def __init__(self, vision_size: int, text_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size, bias=bias, dtype=dtype)
        self.linear_2 = nn.Linear(text_size, text_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    """The language model's interface (``forward``, ``compute_logits``, ``model.layers``), plus
    :meth:`image_features` and :meth:`set_image_rows`.

    Invariant: between two ``set_image_rows`` calls, ``forward`` puts ``features[i]`` at row
    ``rows[i]`` of its flat batch, in place of that row's token embedding.
    """

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, max_positions: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("quantized multimodal models are not supported")
        text = config.text_config
        if text.model_type != "llama":
            raise ValueError(f"LLaVA with a {text.model_type!r} language model is not supported (llama is)")
        if config.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"LLaVA with a {config.vision_config.model_type!r} vision tower is not supported (CLIP is)")
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported")
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("a vision_feature_layer list (features of several layers) is not supported")
        if config.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {config.projector_hidden_act!r} is not supported (gelu is)")
        self.config = config
        self.image_token_id = config.image_token_id
        self.language_model = LlamaForCausalLM(text, dtype, max_positions)
        self.vision_tower = CLIPVisionModel(config.vision_config).to(dtype).eval()
        self.multi_modal_projector = LlavaProjector(
            config.vision_config.hidden_size, text.hidden_size, getattr(config, "multimodal_projector_bias", True), dtype
        )
        self._rows: torch.Tensor | None = None
        self._features: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        """The language model's decoder stack (what the engine sizes the KV cache by)."""
        return self.language_model.model

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, 3, H, W]`` -> ``[images, tokens, text hidden]``: the chosen layer's patch
        vectors (without CLS under the ``default`` strategy), projected."""
        out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def set_image_rows(self, rows: torch.Tensor | None, features: torch.Tensor | None) -> None:
        """The next forward's image rows (``[R]`` row indices of its flat batch) and their
        features (``[R, text hidden]``); None: a step without image tokens."""
        self._rows, self._features = rows, features

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                num_layers: int | None = None) -> torch.Tensor:
        embeds = None
        if self._rows is not None:
            embeds = self.language_model.model.embed_tokens(input_ids)
            embeds[self._rows] = self._features.to(embeds.dtype)
        return self.language_model.model(input_ids, positions, attn, num_layers, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Route each checkpoint tensor to its part, under the part's own names; each part is
        loaded strictly (unknown or missing tensors name themselves)."""
        language, vision, projector = [], {}, {}
        for name, tensor in weights:
            if name in _LM_HEAD_NAMES:
                language.append(("lm_head.weight", tensor))
            elif name.startswith(_LANGUAGE_PREFIXES):
                language.append(("model." + _strip(name, _LANGUAGE_PREFIXES), tensor))
            elif name.startswith(_PROJECTOR_PREFIXES):
                projector[_strip(name, _PROJECTOR_PREFIXES)] = tensor
            elif name.startswith(_VISION_PREFIXES):
                vision[_strip(name, _VISION_PREFIXES)] = tensor
            else:
                raise ValueError(f"checkpoint tensor {name!r} belongs to no part of LLaVA")
        self.language_model.load_weights(language)
        vision.pop("embeddings.position_ids", None)  # a buffer older checkpoints saved
        _load_strict(self.vision_tower, vision, "vision tower")
        _load_strict(self.multi_modal_projector, projector, "projector")


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    return name[len(next(p for p in prefixes if name.startswith(p))):]


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], part: str) -> None:
    result = module.load_state_dict(tensors, strict=False)
    problems = [*(f"missing {n}" for n in result.missing_keys), *(f"unexpected {n}" for n in result.unexpected_keys)]
    if problems:
        raise ValueError(f"the {part}'s checkpoint tensors do not fit: {problems[:6]}")
