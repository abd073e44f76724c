"""Building the proposer a :class:`~nanoengine.config.SpeculativeConfig` asks for."""

from __future__ import annotations

import dataclasses

import torch

from nanoengine.attention.registry import AttentionFn
from nanoengine.attention.torch_paged import PagedKVCache
from nanoengine.config import ModelConfig, SpeculativeConfig
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import LoadedModel, load_model
from nanoengine.platform import dtype_name
from nanoengine.spec_decode.draft_model import DraftModelProposer, EarlyExit
from nanoengine.spec_decode.ngram import NgramProposer
from nanoengine.spec_decode.proposer import Proposer


@dataclasses.dataclass(slots=True)
class Draft:
    """A draft model ready to guess: the callable model (``forward`` and ``compute_logits``),
    the loaded model it comes from (the target itself for self-speculation), and how many of
    its layers run, which is how many layers its KV cache needs."""

    model: object
    loaded: LoadedModel
    num_layers: int


def load_draft(spec: SpeculativeConfig, target: LoadedModel) -> Draft | None:
    """The draft model of a ``draft_model`` config (None for prompt lookup).

    A separate draft must share the target's tokenizer and vocabulary, or its guesses would
    name other tokens than the target's logits.
    """
    if spec.method != "draft_model":
        return None
    loaded = target
    if spec.model is not None:
        loaded = load_model(ModelConfig(model=spec.model, dtype=dtype_name(target.dtype), device=target.device.type,
                                        fast_path=target.fast_path, enforce_eager=target.enforce_eager))
        if (loaded.hf_config.vocab_size != target.hf_config.vocab_size
                or loaded.tokenizer.get_vocab() != target.tokenizer.get_vocab()):
            raise ValueError(f"the draft model {spec.model!r} has another tokenizer than the target; "
                             "speculation needs the same one")
    num_layers = spec.draft_num_layers or loaded.hf_config.num_hidden_layers
    return Draft(EarlyExit(loaded.model, num_layers), loaded, num_layers)


def draft_kv_cache(draft: Draft, num_blocks: int, block_size: int) -> PagedKVCache:
    """The draft's own KV pool: as many blocks as the target's (it is read through the
    target's block tables), with the draft's layers and heads."""
    config = draft.loaded.hf_config
    return PagedKVCache(draft.num_layers, num_blocks, block_size, config.num_key_value_heads, head_dim_of(config),
                        draft.loaded.dtype, draft.loaded.device)


def build_proposer(
    spec: SpeculativeConfig, draft: Draft | None, num_blocks: int, block_size: int, attention_fn: AttentionFn,
    shared_generator: torch.Generator,
) -> Proposer:
    if spec.method == "ngram":
        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    cache = draft_kv_cache(draft, num_blocks, block_size)
    return DraftModelProposer(draft.model, cache, attention_fn, shared_generator)
