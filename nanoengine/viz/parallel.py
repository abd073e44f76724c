"""Lesson 12's picture: one decoder layer's matrices, and the vocabulary's, split across
tensor-parallel ranks, with the communication each split needs.

The slices come from :func:`nanoengine.parallel.plan.sharding_plan`, which reads them off the
real layers built for each rank, so the picture shows what the engine does.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Patch, Rectangle
from transformers import PretrainedConfig

from nanoengine.parallel.plan import COLUMN, ROW, VOCAB, ShardRow, sharding_plan
from nanoengine.viz.style import REQUEST_PALETTE

# Lighter shades for the later parts of a fused matrix (k and v after q; up after gate).
_PART_ALPHA = (1.0, 0.62, 0.36)
_COMM = "#C44E52"


def rank_color(rank: int) -> str:
    return REQUEST_PALETTE[rank % len(REQUEST_PALETTE)]


def _draw_matrix(ax: Axes, row: ShardRow, padded_rows: int | None = None) -> None:
    """The full weight ``[outputs, inputs]`` (row 0 at the top), each rank's slice in its colour.

    Every slice is one Rectangle with ``gid = "rank{r}"``; vocabulary padding is one hatched
    Rectangle with ``gid = "padding"``.
    """
    outputs, inputs = row.full_shape
    height = padded_rows or outputs
    for share in row.shares:
        for part, held in enumerate(share.ranges):
            alpha = _PART_ALPHA[part] if row.parts else 1.0
            if row.dim == 1:
                xy, width, tall = (held.start, 0), len(held), outputs
            else:
                xy, width, tall = (0, held.start), inputs, len(held)
            ax.add_patch(Rectangle(xy, width, tall, facecolor=rank_color(share.rank), alpha=alpha, lw=0.6,
                                   edgecolor="white", gid=f"rank{share.rank}"))
    if height > outputs:
        ax.add_patch(Rectangle((0, outputs), inputs, height - outputs, facecolor="white", edgecolor="#8C8C8C",
                               hatch="///", lw=0.6, gid="padding"))
    ax.add_patch(Rectangle((0, 0), inputs, outputs, fill=False, edgecolor="black", lw=1.2))
    ax.set_xlim(0, inputs)
    ax.set_ylim(height, 0)
    ax.set_xticks([0, inputs])
    if row.parts:  # name each part of a fused matrix at its middle
        starts = sorted(r.start for share in row.shares for r in share.ranges)
        size = len(row.shares)
        bounds = [starts[i * size] for i in range(len(row.parts))] + [outputs]
        for bound in bounds[1:-1]:
            ax.axhline(bound, color="black", lw=1.2)
        ax.set_yticks([(a + b) / 2 for a, b in zip(bounds, bounds[1:])], row.parts)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([0, outputs])
    ax.tick_params(labelsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _shape(share_shape: tuple[int, ...]) -> str:
    return " × ".join(str(n) for n in share_shape)


def tensor_parallel_sharding(hf_config: PretrainedConfig, tp_size: int) -> Figure:
    """One decoder layer and the vocabulary matrices of ``hf_config``'s model over
    ``tp_size`` ranks: each weight ``[outputs, inputs]`` drawn whole, each rank's slice in its
    colour; column-parallel layers split output rows, row-parallel ones input columns. Arrows
    and red labels say where the ranks communicate (an all-reduce after each row-parallel
    layer and after the embedding, an all-gather after the head). Six axes: qkv_proj,
    o_proj, gate_up_proj, down_proj, embed_tokens, lm_head.
    """
    plan = {row.name: row for row in sharding_plan(hf_config, tp_size)}
    layer = "model.layers.0"
    heads, kv_heads = hf_config.num_attention_heads // tp_size, hf_config.num_key_value_heads // tp_size
    hidden = hf_config.hidden_size
    embed = plan["model.embed_tokens.weight"]
    head = plan.get("lm_head.weight", embed)
    padded = embed.shares[-1].ranges[-1].stop if embed.kind == VOCAB else None
    panels = [
        (plan[f"{layer}.self_attn.qkv_proj.weight"], "qkv_proj: column-parallel (by heads)",
         f"{heads} q head{'s' * (heads != 1)} + {kv_heads} KV head{'s' * (kv_heads != 1)} per rank"),
        (plan[f"{layer}.self_attn.o_proj.weight"], "o_proj: row-parallel", "its heads' inputs per rank"),
        (plan[f"{layer}.mlp.gate_up_proj.weight"], "gate_up_proj: column-parallel", "matching gate and up rows"),
        (plan[f"{layer}.mlp.down_proj.weight"], "down_proj: row-parallel", "its gate_up rows' inputs per rank"),
        (embed, "embed_tokens: vocabulary-parallel", "a range of token rows per rank"),
        (head, "lm_head: vocabulary-parallel" + (" (tied)" if hf_config.tie_word_embeddings else ""),
         "the same ranges of logits"),
    ]
    fig = Figure(figsize=(11.5, 10.5))
    grid = fig.add_gridspec(3, 2, left=0.07, right=0.8, top=0.9, bottom=0.06, hspace=0.62, wspace=0.55)
    axes = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(6)]
    for ax, (row, title, what) in zip(axes, panels):
        _draw_matrix(ax, row, padded if row.kind == VOCAB else None)
        shares = {_shape(s.shape) for s in row.shares}
        each = f"each rank holds {shares.pop()}" if len(shares) == 1 else "ranks hold " + ", ".join(sorted(shares))
        ax.set_title(f"{title}\nfull {_shape(row.full_shape)}", fontsize=9.5)
        ax.set_xlabel(f"{'inputs (split)' if row.kind == ROW else 'inputs'}  ·  {each}\n{what}", fontsize=8.5)
    # Between the columns: what runs on each rank's slice with no communication.
    between = [f"attention on each rank's\n{heads} q / {kv_heads} KV heads:\nno communication",
               "silu(gate) · up on each\nrank's rows: no communication",
               None]
    for (left, right), text in zip(zip(axes[::2], axes[1::2]), between):
        if text is None:
            continue
        fig.add_artist(ConnectionPatch((1.04, 0.5), (-0.2, 0.5), "axes fraction", "axes fraction", axesA=left,
                                       axesB=right, arrowstyle="->", color="#555555", lw=1.2))
        left.text(1.27, 0.62, text, transform=left.transAxes, ha="center", va="bottom", fontsize=7.5)
    # On the right: the collective each row of the picture ends in.
    after = [f"all-reduce: sum {tp_size}\npartial [T, {hidden}]\noutputs",
             f"all-reduce: sum {tp_size}\npartial [T, {hidden}]\noutputs",
             f"all-gather {tp_size}\n[T, {embed.shares[0].shape[0]}] logits"
             + (",\ndrop the padding" if padded and padded > hf_config.vocab_size else "")]
    for ax, text in zip(axes[1::2], after):
        ax.annotate(text, (1.0, 0.5), xycoords="axes fraction", xytext=(1.12, 0.5), textcoords="axes fraction",
                    ha="left", va="center", fontsize=8.5, color=_COMM,
                    arrowprops=dict(arrowstyle="<-", color=_COMM, lw=1.2),
                    bbox=dict(boxstyle="round,pad=0.35", fc="white", ec=_COMM, lw=1))
    axes[4].annotate(f"look up its own rows,\nzero the others:\nall-reduce [T, {hidden}]", (1.0, 0.5),
                     xycoords="axes fraction", xytext=(1.08, 0.5), textcoords="axes fraction", ha="left",
                     va="center", fontsize=8.5, color=_COMM, arrowprops=dict(arrowstyle="<-", color=_COMM, lw=1.2),
                     bbox=dict(boxstyle="round,pad=0.35", fc="white", ec=_COMM, lw=1))
    handles = [Patch(color=rank_color(r), label=f"tensor rank {r}") for r in range(tp_size)]
    if padded and padded > hf_config.vocab_size:
        handles.append(Patch(facecolor="white", edgecolor="#8C8C8C", hatch="///", label="vocabulary padding"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=9,
               bbox_to_anchor=(0.45, 0.965))
    fig.suptitle(f"One decoder layer over {tp_size} tensor-parallel ranks (weights as [outputs, inputs]; "
                 "lighter shades: k, v, up)", fontsize=10.5, x=0.45, y=0.995)
    return fig
