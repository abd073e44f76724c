"""The anatomy of a Llama-family decoder: its blocks, shapes and where the parameters are."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from transformers import PretrainedConfig

from nanoengine.model.llama import head_dim_of
from nanoengine.viz.style import COLORS


def parameter_counts(config: PretrainedConfig) -> dict[str, int]:
    """Parameters per component, from the config alone (no weights needed)."""
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    counts = {
        "embedding": config.vocab_size * hidden,
        "attention": layers * (hidden * (q + 2 * kv) + q * hidden),
        "mlp": layers * 3 * hidden * inter,
        "norms": (2 * layers + 1) * hidden,
    }
    if not config.tie_word_embeddings:
        counts["lm_head"] = config.vocab_size * hidden
    return counts


def model_anatomy(config: PretrainedConfig, name: str = "") -> Figure:
    """A block diagram of the decoder with tensor shapes, beside each component's parameter share."""
    fig = Figure(figsize=(11, 6.2))
    ax, bars = fig.add_axes((0.02, 0.02, 0.5, 0.9)), fig.add_axes((0.62, 0.15, 0.35, 0.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 12.5)
    ax.axis("off")
    hd = head_dim_of(config)
    h, v = config.hidden_size, config.vocab_size
    rows = [
        (11.2, "embed", f"token embedding  [{v} × {h}]"),
        (9.7, "norm", "RMSNorm"),
        (8.7, "attn", f"attention: q {config.num_attention_heads} heads, k/v {config.num_key_value_heads} heads, d={hd}, RoPE"),
        (7.7, "norm", "RMSNorm"),
        (6.7, "mlp", f"SwiGLU MLP  {h} → 2×{config.intermediate_size} → {h}"),
        (4.6, "norm", "final RMSNorm"),
        (3.4, "embed", f"LM head [{h} × {v}]" + ("  (tied to the embedding)" if config.tie_word_embeddings else "")),
        (2.2, "new", "logits → sampler → next token"),
    ]
    for y, kind, text in rows:
        ax.add_patch(FancyBboxPatch((1.0, y - 0.35), 8.3, 0.7, boxstyle="round,pad=0.05", fc=COLORS[kind], alpha=0.8, ec="black", lw=0.6))
        ax.text(5.15, y, text, ha="center", va="center", fontsize=9, color="white" if kind != "norm" else "black")
    ax.add_patch(FancyBboxPatch((0.6, 6.1), 9.1, 4.2, boxstyle="round,pad=0.1", fc="none", ec="gray", ls="--"))
    ax.text(9.85, 8.2, f"× {config.num_hidden_layers}\nlayers", ha="left", va="center", fontsize=10)
    for y0, y1 in [(10.85, 10.05), (9.35, 9.05), (8.35, 8.05), (7.35, 7.05), (6.35, 4.95), (4.25, 3.75), (3.05, 2.55)]:
        ax.annotate("", xy=(5.15, y1), xytext=(5.15, y0), arrowprops={"arrowstyle": "->", "lw": 1})
    ax.text(5.15, 12.2, f"{name or config.architectures[0]}: the decoder", ha="center", fontsize=12, weight="bold")
    counts = parameter_counts(config)
    total = sum(counts.values())
    names = list(counts)
    kinds = {"embedding": "embed", "attention": "attn", "mlp": "mlp", "norms": "norm", "lm_head": "embed"}
    bars.barh(names, [counts[n] / 1e6 for n in names], color=[COLORS[kinds[n]] for n in names])
    for i, n in enumerate(names):
        size = f"{counts[n] / 1e6:.1f}M" if counts[n] >= 1e5 else f"{counts[n] / 1e3:.1f}K"
        bars.text(counts[n] / 1e6, i, f" {size} ({100 * counts[n] / total:.1f}%)", va="center", fontsize=9)
    bars.set_xlabel("parameters (millions)")
    bars.set_title(f"{total / 1e6:.1f}M parameters", fontsize=11)
    bars.invert_yaxis()
    bars.set_xlim(0, max(counts.values()) / 1e6 * 1.45)
    return fig
