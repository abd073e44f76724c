"""Lesson 16, mixture of experts: Mixtral and Qwen2-MoE.

The routing is held to transformers' own routers, the grouped experts to the readable
per-token loop, and expert parallelism to one rank (the whole models against transformers
are in test_l16_models.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from nanoengine.config import ModelConfig
from nanoengine.model import load_model
from nanoengine.model.layers.moe import experts_grouped, experts_reference, route
from tests.parallel_ranks import greedy_tokens, parallel_llm

pytestmark = pytest.mark.l16

MOE_NAMES = ["mixtral", "qwen2-moe"]


@pytest.mark.l16_t1
@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe-normalized", "qwen2-moe"])
def test_routing_picks_what_transformers_routers_pick(family):
    torch.manual_seed(0)
    if family == "mixtral":
        router, renormalize = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=8)), True
    else:
        renormalize = family.endswith("normalized")
        router = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=8, norm_topk_prob=renormalize))
    router.weight.data.normal_()
    x = torch.randn(32, 16)
    logits, want_weights, want_ids = router(x)
    weights, ids = route(logits, router.top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.l16_t2
@given(tokens=st.integers(1, 12), experts=st.sampled_from([1, 2, 4, 8]), top_k=st.integers(1, 3),
       ranks=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_grouped_experts_equal_the_per_token_loop_on_every_split(tokens, experts, top_k, ranks, seed):
    """Every rank's share (experts split evenly) equals the loop over that share, and the
    shares sum to the whole: what the all-reduce of expert parallelism relies on."""
    top_k = min(top_k, experts)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=generator)
    w13, w2 = torch.randn(experts, 12, 8, generator=generator), torch.randn(experts, 8, 6, generator=generator)
    # the routing is task L16.T1's: here any top-k choice with weights will do
    weights, ids = torch.softmax(torch.randn(tokens, experts, generator=generator), -1).topk(top_k, dim=-1)
    whole = experts_reference(x, w13, w2, weights, ids)
    share = experts // ranks if experts % ranks == 0 else experts
    parts = []
    for first in range(0, experts, share):
        mine = slice(first, first + share)
        part = experts_grouped(x, w13[mine], w2[mine], weights, ids, first)
        torch.testing.assert_close(part, experts_reference(x, w13[mine], w2[mine], weights, ids, first))
        parts.append(part)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-5)


def test_qwen2_moe_keeps_the_layers_its_config_lists_dense(ours):
    layers = ours("qwen2-moe").model.model.layers
    assert layers[0].mlp.shared_expert is not None and layers[0].mlp.experts.w13.shape == (4, 128, 64)
    assert not hasattr(layers[1].mlp, "experts")  # mlp_only_layers: [1]


@pytest.mark.parametrize("name", MOE_NAMES)
def test_expert_parallel_ranks_each_hold_half_the_experts_and_give_one_ranks_tokens(name, zoo_paths):
    want = greedy_tokens(parallel_llm(zoo_paths[name]))
    llm = parallel_llm(zoo_paths[name], tp=2)
    try:
        experts = llm.loaded.model.model.layers[0].mlp.experts
        assert (experts.num_local_experts, experts.first_expert) == (2, 0)
        assert greedy_tokens(llm) == want
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


def _copy_with(zoo_path, tmp_path, edit_config=None, drop=None):
    path = tmp_path / "model"
    shutil.copytree(zoo_path, path)
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if drop:
        tensors = load_file(path / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if drop not in k}, path / "model.safetensors", {"format": "pt"})
    return path


def test_a_checkpoint_missing_an_expert_is_refused_by_name(zoo_paths, tmp_path):
    path = _copy_with(zoo_paths["mixtral"], tmp_path, drop="layers.1.block_sparse_moe.experts.3.w2")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w2\[\(3, 'down'\)\]"):
        load_model(ModelConfig(model=str(path), dtype="float32"))


def test_a_checkpoint_naming_an_expert_the_config_lacks_is_refused(zoo_paths, tmp_path):
    path = _copy_with(zoo_paths["mixtral"], tmp_path, edit_config=lambda c: c.update(num_local_experts=3))
    with pytest.raises(ValueError, match="names expert 3, but the model has 3"):
        load_model(ModelConfig(model=str(path), dtype="float32"))


def test_experts_that_do_not_split_across_ranks_are_refused_by_name(zoo_paths, tmp_path):
    path = _copy_with(zoo_paths["mixtral"], tmp_path, edit_config=lambda c: c.update(num_local_experts=3))
    with pytest.raises(ValueError, match=r"the number of experts \(3\) must be divisible by tensor_parallel_size"):
        parallel_llm(path, tp=2)
    assert not dist.is_initialized()


def test_quantizing_experts_is_refused_by_name(zoo_paths):
    with pytest.raises(ValueError, match="quantized mixture-of-experts"):
        load_model(ModelConfig(model=str(zoo_paths["mixtral"]), dtype="float32", quantization="int8"))


def test_lora_on_a_mixture_of_experts_is_refused_by_name(zoo_paths):
    from nanoengine import LLM

    with pytest.raises(ValueError, match="mixture of experts.*LoRA on experts is not supported"):
        LLM(str(zoo_paths["mixtral"]), dtype="float32", enable_lora=True)
