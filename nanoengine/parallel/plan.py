"""Which rank holds which part of every weight: the sharding plan, read off the real layers.

Lesson 12's tables and figure show how a model is split, and they must never tell a story
the code does not. So the plan is not computed from formulas: :func:`sharding_plan` builds
the model once per rank on PyTorch's ``meta`` device (shapes, no memory, no weights read)
under that rank's :class:`~nanoengine.parallel.state.RankLayout`, and reads each parameter's
shape and the layer's own record of its share (``tp.rank``, ``split``, ``shard_offsets``,
``vocab_start``, ``rows``). A rank's shape that its ranges do not account for fails loudly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PretrainedConfig

from nanoengine.model.layers.linear import LinearBase
from nanoengine.model.registry import model_class_for
from nanoengine.parallel.state import ParallelGroup, RankLayout, building_for, rank_layout

# The kinds of row: which side of the full tensor the ranks of a stage divide.
COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"


@dataclasses.dataclass(frozen=True, slots=True)
class RankShare:
    """What one rank holds of a parameter.

    ``shape`` is the parameter's shape on that rank; ``ranges`` are the indices of the full
    tensor along the row's ``dim`` that it holds, in the order it stores them (a fused layer
    has one range per part, e.g. its q, k and v rows); empty when the rank holds it whole
    (replicated: every rank of the stage has the same copy).
    Invariant: the ranges' lengths add up to ``shape[dim]``.
    """

    rank: int
    shape: tuple[int, ...]
    ranges: tuple[range, ...] = ()

    def describe(self) -> str:
        """``"[192:384, 768:832]"``, or ``"replicated"``."""
        if not self.ranges:
            return "replicated"
        return "[" + ", ".join(f"{r.start}:{r.stop}" for r in self.ranges) + "]"


@dataclasses.dataclass(frozen=True, slots=True)
class ShardRow:
    """One parameter of the model, and its share on every rank of the stage that holds it.

    ``name`` as in ``model.named_parameters()`` (fused: ``qkv_proj``, ``gate_up_proj``);
    ``full_shape`` the parameter's shape on one rank (a vocabulary matrix: the checkpoint's,
    before padding); ``kind`` one of ``column`` (output rows split), ``row`` (input columns
    split), ``vocab`` (vocabulary rows split, padded to a multiple of the group), ``replicated``;
    ``dim`` the split dimension (None when replicated); ``parts`` the fused parts in storage
    order; ``stage`` the pipeline stage holding it; ``shares`` one per tensor rank of that
    stage, in tensor-rank order. ``note`` says what the table alone would not.

    Invariant: for a split row, the shares' ranges tile ``range(padded)`` along ``dim``
    exactly once, where ``padded`` is ``full_shape[dim]`` (plus the vocabulary's padding).
    """

    name: str
    full_shape: tuple[int, ...]
    kind: str
    dim: int | None
    stage: int
    shares: tuple[RankShare, ...]
    parts: tuple[str, ...] = ()
    note: str = ""

    @property
    def held(self) -> str:
        """How the row is held, in a word or two: ``"split by output rows"``, ``"replicated"``…"""
        return {COLUMN: "split by output rows", ROW: "split by input columns", VOCAB: "split by vocabulary rows",
                REPLICATED: "replicated"}[self.kind]


def _build(hf_config: PretrainedConfig, layout: RankLayout) -> nn.Module:
    with torch.device("meta"), building_for(layout):
        return model_class_for(hf_config)(hf_config, torch.float32, 64, None)


_PARTS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}


def _share(module: nn.Module, param_name: str, shape: tuple[int, ...], rank: int) -> tuple[str, int | None, RankShare]:
    """``(kind, dim, share)`` of one parameter on one rank, from its layer's own attributes."""
    tp: ParallelGroup = module.tp if hasattr(module, "tp") else ParallelGroup()
    if hasattr(module, "vocab_start") and tp.size > 1:  # VocabEmbedding, LMHead
        return VOCAB, 0, RankShare(rank, shape, (range(module.vocab_start, module.vocab_start + module.rows),))
    if not isinstance(module, LinearBase) or tp.size == 1:
        return REPLICATED, None, RankShare(rank, shape)
    if module.split == "input":
        if param_name == "bias":  # the full output: tensor rank 0 adds it once, before the all-reduce
            return REPLICATED, None, RankShare(rank, shape)
        width = module.input_size
        return ROW, 1, RankShare(rank, shape, (range(tp.rank * width, (tp.rank + 1) * width),))
    offsets = getattr(module, "shard_offsets", {"": (0, module.output_size)})
    # Every part is split evenly, so part p starts at (its local start) * tp in the full tensor.
    ranges = tuple(range(start * tp.size + tp.rank * size, start * tp.size + (tp.rank + 1) * size)
                   for start, size in offsets.values())
    return COLUMN, 0, RankShare(rank, shape, ranges)


def sharding_plan(
    hf_config: PretrainedConfig, tp_size: int, pp_size: int = 1, all_layers: bool = False
) -> list[ShardRow]:
    """Every rank's share of the model's parameters for ``tp_size × pp_size`` ranks.

    Rows come in the model's parameter order. Without ``all_layers`` only the first decoder
    layer of each stage is listed (layer 0 when ``pp_size`` is 1), beside the embedding, the
    final norm and the head: every layer of a stage is split the same way. A tied head is
    listed as ``lm_head.weight`` too (the embedding's own matrix). Raises the model's own
    ``ValueError`` for a split it refuses (heads that ``tp_size`` does not divide, naming
    ``num_attention_heads`` or ``num_key_value_heads``).
    """
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size and pp_size must be positive; got {tp_size} and {pp_size}")
    if pp_size > hf_config.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) exceeds num_hidden_layers "
                         f"({hf_config.num_hidden_layers})")
    full = dict(_build(hf_config, rank_layout(1, 1, 0)).named_parameters(remove_duplicate=False))
    rows = []
    for stage in range(pp_size):
        models = [_build(hf_config, rank_layout(tp_size, pp_size, stage * tp_size + t)) for t in range(tp_size)]
        first = models[0].model.first_layer
        for name, _ in models[0].named_parameters(remove_duplicate=False):
            if not all_layers and name.startswith("model.layers.") and int(name.split(".")[2]) != first:
                continue
            module_name, param_name = name.rsplit(".", 1)
            kinds = [_share(m.get_submodule(module_name), param_name, tuple(m.get_parameter(name).shape),
                            stage * tp_size + t) for t, m in enumerate(models)]
            (kind, dim, _), shares = kinds[0], tuple(share for _, _, share in kinds)
            for share in shares:
                if dim is not None and sum(len(r) for r in share.ranges) != share.shape[dim]:
                    raise AssertionError(f"{name} on rank {share.rank}: ranges {share.describe()} "
                                         f"do not match its shape {share.shape}")
            rows.append(ShardRow(name, tuple(full[name].shape), kind, dim, stage, shares,
                                 _PARTS.get(module_name.rsplit(".", 1)[-1], ()) if kind == COLUMN else (),
                                 _note(hf_config, name, kind, shares)))
    return rows


def _note(hf_config: PretrainedConfig, name: str, kind: str, shares: tuple[RankShare, ...]) -> str:
    notes = []
    if name == "lm_head.weight" and hf_config.tie_word_embeddings:
        notes.append("tied: the embedding's matrix")
    if kind == VOCAB:
        padded = shares[-1].ranges[-1].stop
        if padded > hf_config.vocab_size:
            notes.append(f"rows {hf_config.vocab_size}:{padded} are zero padding")
    if kind == REPLICATED and len(shares) > 1 and name.endswith(".bias"):
        notes.append("added by tensor rank 0 only")
    return "; ".join(notes)


def plan_table(rows: list[ShardRow]) -> str:
    """The plan as a fixed-width text table: one line per parameter and rank."""
    lines = [f"{'parameter':48} {'full shape':>13}  {'stage':>5} {'rank':>4}  {'shape on rank':>13}  holds"]
    for row in rows:
        for i, share in enumerate(row.shares):
            first = i == 0
            if row.dim is not None:
                held = f"{'rows' if row.dim == 0 else 'cols'} {share.describe()}"
            else:
                held = share.describe() if len(row.shares) > 1 else "whole"
            lines.append(f"{row.name if first else '':48} {str(row.full_shape) if first else '':>13}  "
                         f"{row.stage:>5} {share.rank:>4}  {str(share.shape):>13}  {held}"
                         + (f"  ({row.note})" if first and row.note else ""))
    return "\n".join(lines)
