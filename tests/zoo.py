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
    model_type, arch, extra = ZOO[name]
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
    for i, name in enumerate(ZOO):
        path = root / name
        build_model(name, len(tokenizer), seed=i).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
