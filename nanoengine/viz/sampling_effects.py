"""Lesson 09's picture of the logits processors: what each one does to a distribution.

Small multiples over a tiny vocabulary: the softmax of the raw logits, then the softmax
after each processor of :mod:`nanoengine.sampling.processors` applied *alone* to the same
logits, so each panel shows one effect. :func:`sampling_distributions` computes the
probabilities with the real processors (the testable part); :func:`sampling_effects` only
draws them. A token a processor removes (logit ``-inf``) has probability 0: an empty,
dashed bar at the height it had before.
"""

from __future__ import annotations

import inspect

from collections.abc import Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from nanoengine.sampling.processors import (
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    token_counts,
)
from nanoengine.viz.style import COLORS

_KEPT, _SEEN, _ORIGINAL, _REMOVED = COLORS["prompt"], "#C44E52", "#555555", "#999999"


def sampling_distributions(
    logits: torch.Tensor,
    *,
    temperature: float = 0.7,
    top_k: int = 5,
    top_p: float = 0.8,
    min_p: float = 0.1,
    repetition_penalty: float = 1.3,
    presence_penalty: float = 0.5,
    frequency_penalty: float = 0.3,
    previous_tokens: Sequence[int] = (0, 0, 2, 8),
) -> dict[str, torch.Tensor]:
    """The next-token distribution (1-D, float32) before and after each processor alone.

    Keys, in drawing order: ``original``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition`` (repetition penalty only) and ``presence_frequency`` (presence and
    frequency penalties, no repetition penalty). ``previous_tokens`` are the tokens generated
    so far: the penalties count them as output tokens (the prompt is left empty).
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (one row of the vocabulary); got shape {tuple(logits.shape)}")
    row = logits.detach().float().cpu()[None]
    counts = token_counts([list(previous_tokens)], row.shape[-1])
    no_prompt = torch.zeros_like(counts, dtype=torch.bool)

    def one(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor([value], dtype=dtype)

    processed = {
        "original": row,
        "temperature": apply_temperature(row, one(temperature)),
        "top_k": apply_top_k(row, one(top_k, torch.long)),
        "top_p": apply_top_p(row, one(top_p)),
        "min_p": apply_min_p(row, one(min_p)),
        "repetition": apply_penalties(row, no_prompt, counts, one(0.0), one(0.0), one(repetition_penalty)),
        "presence_frequency": apply_penalties(row, no_prompt, counts, one(presence_penalty), one(frequency_penalty),
                                              one(1.0)),
    }
    return {name: values.softmax(dim=-1)[0] for name, values in processed.items()}


def sampling_effects(logits: torch.Tensor, *, labels: Sequence[str] | None = None, **settings) -> Figure:
    """Bar charts of the next-token distribution: the original, then after each processor alone
    (see :func:`sampling_distributions`, whose settings and defaults ``settings`` are). A grey
    tick marks each token's original probability; the penalty panels mark the previous tokens
    (and how often each occurred) in red. ``labels`` names the tokens (default: their ids).
    """
    defaults = {name: p.default for name, p in inspect.signature(sampling_distributions).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; choose from {sorted(defaults)}")
    settings = {**defaults, **settings}
    temperature, top_k, top_p, min_p = (settings[k] for k in ("temperature", "top_k", "top_p", "min_p"))
    repetition_penalty, presence_penalty, frequency_penalty, previous_tokens = (
        settings[k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty", "previous_tokens"))
    probs = {name: p.tolist() for name, p in sampling_distributions(logits, **settings).items()}
    vocab = len(probs["original"])
    names = list(labels) if labels is not None else [str(i) for i in range(vocab)]
    if len(names) != vocab:
        raise ValueError(f"{len(names)} labels for a vocabulary of {vocab} tokens")
    counts = [list(previous_tokens).count(t) for t in range(vocab)]
    titles = {
        "original": "original: softmax(logits)",
        "temperature": f"temperature {temperature:g}: logits ÷ {temperature:g}",
        "top_k": f"top-k {top_k}: the {top_k} most likely",
        "top_p": f"top-p {top_p:g}: fewest tokens reaching {top_p:.0%}",
        "min_p": f"min-p {min_p:g}: drop p < {min_p:g} × max p",
        "repetition": f"repetition penalty {repetition_penalty:g}:\n"
                      f"seen logits ÷ {repetition_penalty:g} (× if negative)",
        "presence_frequency": f"presence {presence_penalty:g}, frequency {frequency_penalty:g}:\n"
                              f"logit − {presence_penalty:g} − {frequency_penalty:g} × count",
    }
    width = max(11.0, 4 * (0.24 * vocab + 0.5))
    fig = Figure(figsize=(width, 6.6))
    grid = fig.add_gridspec(2, 4, left=0.5 / width, right=1 - 0.15 / width, top=0.88, bottom=0.12,
                            hspace=0.75, wspace=0.12)
    top = max(max(p) for p in probs.values()) * 1.18
    axes = []
    for i, name in enumerate(probs):
        ax = fig.add_subplot(grid[i // 4, i % 4], sharey=axes[0] if axes else None)
        marked = counts if name in ("repetition", "presence_frequency") else None
        _draw_panel(ax, probs[name], probs["original"], names, marked, titles[name], show_original=i > 0)
        if i % 4:
            ax.tick_params(labelleft=False)
        else:
            ax.set_ylabel("probability", fontsize=9)
        axes.append(ax)
    axes[0].set_ylim(0, top)
    key = fig.add_subplot(grid[1, 3])
    key.axis("off")
    key.legend(handles=[
        Patch(fc=_KEPT, label="probability after the processor"),
        Line2D([], [], color=_ORIGINAL, lw=2, label="probability before it"),
        Patch(fc="none", ec=_REMOVED, ls="--", lw=1, label="removed: probability 0"),
        Patch(fc=_SEEN, label=f"a previous token (×n: its count)\nprevious: {_spell(previous_tokens, names)}"),
    ], loc="center", fontsize=8.5, frameon=False)
    fig.suptitle("Each logits processor alone, on the same logits (the sampler chains them: penalties, "
                 "temperature, min-p, top-k, top-p)", fontsize=11)
    return fig


def _draw_panel(ax: Axes, probs: list[float], original: list[float], names: list[str], counts: list[int] | None,
                title: str, show_original: bool) -> None:
    xs = range(len(probs))
    kept = [p > 0 for p in probs]
    colors = [_SEEN if counts and counts[i] else _KEPT for i in xs]
    ax.bar(xs, probs, width=0.75, color=colors, gid="kept")
    removed = [i for i in xs if not kept[i]]
    if removed:
        ax.bar(removed, [original[i] for i in removed], width=0.75, fc="none", ec=_REMOVED, ls="--", lw=0.9,
               gid="removed")
        ax.text(0.97, 0.95, f"kept {sum(kept)} of {len(probs)}", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="#444444")
    if show_original:
        ax.scatter(xs, original, marker="_", s=110, color=_ORIGINAL, lw=1.6, zorder=3)
    counts = counts or [0] * len(probs)
    ax.set_xticks(list(xs), [f"{n} ×{c}" if c else n for n, c in zip(names, counts)], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=8)
    for label, c in zip(ax.get_xticklabels(), counts):
        label.set_color(_SEEN if c else "black")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(-0.6, len(probs) - 0.4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _spell(tokens: Sequence[int], names: list[str]) -> str:
    return " ".join(names[t] for t in tokens) if tokens else "none"
