"""The tiny model zoo: random-weight models built from configs, one per architecture variant.

Each is a real transformers model (the oracle), saved with ``save_pretrained`` so that
nanoengine loads it through its own loader. Weights are drawn with a larger spread than
transformers' default so that logits are peaked and greedy choices are rarely near-ties.
The tokenizer is a small byte-level BPE trained here on text with multi-byte characters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Paging splits the KV cache into fixed-size blocks. ",
    "Ünïcödé: naïve café, 東京 and 北京, emoji 🚀🌍, Ελληνικά, русский текст. ",
    "def attention(q, k, v): return softmax(q @ k.T) @ v\n",
] * 20
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.25,
    eos_token_id=0,
    bos_token_id=1,
    pad_token_id=0,
)

# name -> (model_type, architecture, extra config)
ZOO = {
    "llama-gqa": ("llama", "LlamaForCausalLM", {}),
    "llama-tied": ("llama", "LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope": (
        "llama",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "mistral": ("mistral", "MistralForCausalLM", {"num_key_value_heads": 1, "sliding_window": None}),
    "qwen2-bias": ("qwen2", "Qwen2ForCausalLM", {}),
    "qwen3-qknorm": ("qwen3", "Qwen3ForCausalLM", {"head_dim": 32}),
}

# Lesson 16's architectures: saved with the zoo, but kept out of ZOO so that earlier lessons'
# tests (parametrized over ZOO) never reach lesson 16's code.
MOE = dict(num_experts_per_tok=2, sliding_window=None)
MODEL_ZOO = {
    "mixtral": ("mixtral", "MixtralForCausalLM", {**MOE, "num_local_experts": 4}),
    # layer 1 is dense (mlp_only_layers); layer 0 has 4 routed experts and a gated shared one
    "qwen2-moe": ("qwen2_moe", "Qwen2MoeForCausalLM", {**MOE, "num_experts": 4, "moe_intermediate_size": 64,
                                                       "shared_expert_intermediate_size": 96,
                                                       "mlp_only_layers": [1]}),
    # a local layer (window 8, RoPE base 10,000) then a global one; the score scale is not head_dim's
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    }),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(name: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    model_type, arch, extra = {**ZOO, **MODEL_ZOO}[name]
    config = AutoConfig.for_model(model_type, architectures=[arch], vocab_size=vocab_size, **{**COMMON, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norm weights and biases, so their loading is checked too
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight") or name_.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name_.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model.eval()


def save_zoo(root: Path) -> dict[str, Path]:
    tokenizer = build_tokenizer()
    paths = {}
    for i, name in enumerate({**ZOO, **MODEL_ZOO}):
        path = root / name
        build_model(name, len(tokenizer), seed=i).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


IMAGE_TOKEN = "<image>"
# The tiny LLaVA's chat template: OpenAI-style content parts, an image part as <image>.
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_llava(path: Path, seed: int = 0) -> Path:
    """A tiny random LLaVA (lesson 16): a 2-layer CLIP tower over 32x32 images in 8x8 patches
    (16 image tokens), a projector and a 2-layer Llama, with its processor."""
    from transformers import (
        CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), **{**COMMON, "initializer_range": 0.25})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a larger spread, as the zoo's text models have
        for name, p in model.named_parameters():
            if "vision_tower" not in name and p.dim() > 1:
                p.normal_(0, 0.25)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
