"""Lesson 12's sharding plan and its picture: every split weight is tiled by its ranks exactly
once, the plan agrees with what loading really puts on each rank, the vocabulary is padded,
the head counts are checked, pipeline stages take their layers, and the figure draws every
rank's slice."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

matplotlib.use("Agg")

from nanoengine.model.registry import model_class_for  # noqa: E402
from nanoengine.parallel.plan import REPLICATED, VOCAB, sharding_plan  # noqa: E402
from nanoengine.parallel.state import building_for, rank_layout  # noqa: E402
from nanoengine.viz import tensor_parallel_sharding  # noqa: E402
from nanoengine.viz.parallel import rank_color  # noqa: E402

pytestmark = pytest.mark.l12


def tiny(num_layers: int = 2, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=11, num_hidden_layers=num_layers,
                       max_position_embeddings=64, tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])


def _indices(row) -> list[int]:
    return sorted(i for share in row.shares for r in share.ranges for i in r)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_every_split_tensor_is_tiled_by_its_ranks_exactly_once(tp, tied):
    config = tiny(tied=tied)
    for row in sharding_plan(config, tp, all_layers=True):
        assert len(row.shares) == tp
        if row.kind == REPLICATED:
            assert all(share.shape == row.full_shape and not share.ranges for share in row.shares), row.name
            continue
        padded = 12 if row.kind == VOCAB else row.full_shape[row.dim]  # 11 tokens over 2 ranks: 6 rows each
        assert _indices(row) == list(range(padded)), f"{row.name}: ranks' ranges overlap or leave a gap"
        for share in row.shares:
            expected = list(row.full_shape)
            expected[row.dim] = sum(len(r) for r in share.ranges)
            assert share.shape == tuple(expected), row.name


def test_the_vocabulary_is_padded_to_equal_shares():
    plan = {row.name: row for row in sharding_plan(tiny(), 2)}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        row = plan[name]
        assert row.kind == VOCAB and row.full_shape == (11, 64)
        assert [share.ranges for share in row.shares] == [(range(0, 6),), (range(6, 12),)]
        assert [share.shape for share in row.shares] == [(6, 64), (6, 64)]
        assert "11:12" in row.note, "the padding row is named"


def test_fused_layers_give_each_rank_its_share_of_every_part():
    plan = {row.name: row for row in sharding_plan(tiny(), 2)}
    qkv = plan["model.layers.0.self_attn.qkv_proj.weight"]  # q 64 rows, k 32, v 32
    assert qkv.parts == ("q", "k", "v")
    assert [s.ranges for s in qkv.shares] == [(range(0, 32), range(64, 80), range(96, 112)),
                                              (range(32, 64), range(80, 96), range(112, 128))]
    down = plan["model.layers.0.mlp.down_proj.weight"]
    assert (down.kind, down.dim) == ("row", 1)
    assert [s.ranges for s in down.shares] == [(range(0, 64),), (range(64, 128),)]


def test_the_plan_agrees_with_what_loading_puts_on_each_rank():
    """The oracle: real weights loaded into each rank's model equal the full (one-rank) model's
    weights at the ranges the plan names."""
    config = tiny()
    torch.manual_seed(0)
    checkpoint = LlamaForCausalLM(config).state_dict()

    def loaded(layout):
        with building_for(layout):
            model = model_class_for(config)(config, torch.float32, 64, None)
        model.load_weights(checkpoint.items())
        return dict(model.named_parameters(remove_duplicate=False))

    full = loaded(rank_layout(1, 1, 0))
    ranks = [loaded(rank_layout(2, 1, r)) for r in range(2)]
    for row in sharding_plan(config, 2, all_layers=True):
        whole = full[row.name]
        if row.kind == VOCAB:
            whole = torch.cat([whole, whole.new_zeros(1, whole.shape[1])])
        for share in row.shares:
            expected = whole if not share.ranges else torch.cat(
                [whole.narrow(row.dim, r.start, len(r)) for r in share.ranges], dim=row.dim)
            assert torch.equal(ranks[share.rank][row.name], expected), f"{row.name} on rank {share.rank}"


def test_heads_that_tp_does_not_divide_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        sharding_plan(tiny(), 4)  # 4 query heads split, 2 KV heads do not
    with pytest.raises(ValueError, match="num_attention_heads"):
        sharding_plan(tiny(), 3)


def test_pipeline_stages_take_contiguous_layers_the_earlier_the_larger():
    plan = sharding_plan(tiny(num_layers=5), 2, 2, all_layers=True)
    stage_of = {int(row.name.split(".")[2]): row.stage for row in plan if row.name.startswith("model.layers.")}
    assert stage_of == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}
    by_name = {row.name: row for row in plan}
    assert by_name["model.embed_tokens.weight"].stage == by_name["lm_head.weight"].stage == 0
    assert by_name["model.norm.weight"].stage == 1
    for row in plan:  # a stage's tensor ranks: global rank = stage * tp + tensor rank
        assert [share.rank for share in row.shares] == [2 * row.stage, 2 * row.stage + 1]
    listed = {row.name.split(".")[2] for row in sharding_plan(tiny(num_layers=5), 1, 2)
              if row.name.startswith("model.layers.")}
    assert listed == {"0", "3"}, "without all_layers: the first layer of each stage"


def test_the_figure_draws_every_ranks_slice_in_its_colour():
    fig = tensor_parallel_sharding(tiny(), 2)
    assert len(fig.axes) == 6
    slices = [[p for p in ax.patches if (p.get_gid() or "").startswith("rank")] for ax in fig.axes]
    # qkv: 3 parts per rank, gate_up: 2, the rest one slice per rank
    assert [len(s) for s in slices] == [6, 2, 4, 2, 2, 2]
    for patch in (p for s in slices for p in s):
        assert matplotlib.colors.same_color(patch.get_facecolor()[:3], rank_color(int(patch.get_gid()[4:])))
    padding = [p for ax in fig.axes for p in ax.patches if p.get_gid() == "padding"]
    assert len(padding) == 2 and all(p.get_height() == 1 for p in padding), "one padded row under each vocab matrix"
    o_proj = slices[1]
    assert sorted((p.get_x(), p.get_width(), p.get_height()) for p in o_proj) == [(0, 32, 64), (32, 32, 64)], \
        "row-parallel: input columns split"
