"""Lesson 11's pictures: the error each format leaves in a weight matrix, and what the formats
buy in memory and speed for what they cost in perplexity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure

from nanoengine.quant.fp8 import dequantize_fp8, quantize_fp8
from nanoengine.quant.int4 import quantize_int4
from nanoengine.quant.int4_kernel import dequantize_int4
from nanoengine.quant.int8 import dequantize_int8, quantize_int8
from nanoengine.viz.style import REQUEST_PALETTE


def format_errors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dequantized - weight`` for int8 per row, int4 in groups of 32 and 64, and FP8 per row."""
    codes, scales = quantize_int8(weight)
    errors = {"int8, per row": dequantize_int8(codes, scales) - weight}
    for group_size in (32, 64):
        codes, scales, mins = quantize_int4(weight, group_size)
        errors[f"int4, groups of {group_size}"] = dequantize_int4(codes, scales, mins, group_size) - weight
    values, fp8_scales = quantize_fp8(weight)
    errors["fp8 (E4M3), per row"] = dequantize_fp8(values, fp8_scales) - weight
    return errors


def quantization_error_histogram(weight: torch.Tensor, errors: Mapping[str, torch.Tensor], title: str = "") -> Figure:
    """Histograms of ``dequantized - weight`` per format, in units of the row's largest |weight|
    (so formats with different scale layouts compare on one axis), log-scaled counts.

    ``errors``: label -> error tensor of ``weight``'s shape.
    """
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 1, 1)
    row_max = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    spread = max(float((e.float() / row_max).abs().max()) for e in errors.values()) or 1.0
    bins = torch.linspace(-spread, spread, 121).tolist()
    for color, (label, error) in zip(REQUEST_PALETTE, errors.items()):
        relative = (error.float() / row_max).flatten()
        rms = float(relative.pow(2).mean().sqrt())
        ax.hist(relative.tolist(), bins=bins, histtype="step", lw=1.6, color=color,
                label=f"{label}: rms {rms:.2e}")
    ax.set_yscale("log")
    ax.set_xlabel("error of each weight / largest |weight| of its row")
    ax.set_ylabel("weights")
    ax.legend(fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# The formats lesson 11 measured (label, key): ``docs/bench/l11_ppl_{key}.json`` holds the
# perplexity record, ``l11_decode_{key}_b{batch}.json`` the latency records.
LESSON11_FORMATS = (
    ("float32", "f32"),
    ("bfloat16", "bf16"),
    ("int8", "int8"),
    ("int4, groups of 32", "int4"),
    ("fp8 (emulated)", "fp8"),
    ("GGUF Q4_1/Q8_0, native", "gguf"),
)


def tradeoff_row(label: str, perplexity_record: dict, latency_records: Sequence[dict]) -> dict:
    """One format's numbers for :func:`quantization_tradeoff`, from a ``nanoengine bench
    perplexity`` result and ``bench latency`` results at several batch sizes."""
    return {
        "label": label,
        "weight_bytes": perplexity_record["weight_bytes"],
        "perplexity": perplexity_record["perplexity"],
        "decode": {r["batch_size"]: r["decode_tokens_per_s"]["median"] for r in latency_records},
    }


def quantization_tradeoff(rows: Sequence[dict]) -> Figure:
    """Per format: resident weight memory (left), decode tokens/s by batch size (middle),
    perplexity of the course text (right); ``rows`` from :func:`tradeoff_row`."""
    fig = Figure(figsize=(12, 3.9))
    memory, speed, quality = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    labels = [r["label"] for r in rows]
    y = list(range(len(rows)))[::-1]
    memory.barh(y, [r["weight_bytes"] / 1e6 for r in rows], color=REQUEST_PALETTE[0], height=0.6)
    for row, r in zip(y, rows):
        memory.annotate(f"{r['weight_bytes'] / 1e6:,.0f} MB", (r["weight_bytes"] / 1e6, row), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8.5)
    memory.set_xlabel("resident weight memory (MB)")
    batches = sorted({b for r in rows for b in r["decode"]})
    height = 0.8 / max(len(batches), 1)
    for i, (color, batch) in enumerate(zip(REQUEST_PALETTE[1:], batches)):
        offsets = [row + 0.4 - height * (i + 0.5) for row in y]
        values = [r["decode"].get(batch, 0.0) for r in rows]
        speed.barh(offsets, values, height=height, color=color, label=f"batch {batch}")
        for offset, value in zip(offsets, values):
            speed.annotate(f"{value:,.0f}", (value, offset), xytext=(3, 0), textcoords="offset points",
                           va="center", fontsize=7.5)
    speed.set_xlabel("decode tokens/s")
    speed.legend(fontsize=8, frameon=False, loc="lower right")
    scores = [r["perplexity"] for r in rows]
    quality.plot(scores, y, "o", color=REQUEST_PALETTE[2], markersize=8)
    for row, score in zip(y, scores):
        quality.annotate(f"{score:.2f}", (score, row), xytext=(7, 0), textcoords="offset points", va="center",
                         fontsize=8.5)
    spread = max(scores) - min(scores)
    quality.set_xlim(min(scores) - 0.3 * spread - 0.05, max(scores) + 0.6 * spread + 0.05)
    quality.grid(axis="x", lw=0.5, alpha=0.5)
    quality.set_xlabel("perplexity of the course text (lower: better)")
    for ax in (memory, speed, quality):
        ax.set_yticks(y, labels if ax is memory else [""] * len(y))
        ax.spines[["top", "right"]].set_visible(False)
    memory.margins(x=0.3)
    speed.margins(x=0.3)
    quality.set_ylim(memory.get_ylim())
    fig.subplots_adjust(left=0.17, right=0.98, wspace=0.12, bottom=0.15)
    return fig
