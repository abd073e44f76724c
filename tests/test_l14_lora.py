"""Lesson 14: multi-LoRA. Adapters made by ``peft`` on the tiny zoo; their oracle is PEFT's
merged model (``merge_and_unload``), one per adapter, run by transformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoengine import LLM, LoRARequest, SamplingParams
from nanoengine.cache.kv_cache_manager import KVCacheManager
from nanoengine.config import LoRAConfig, ModelConfig
from nanoengine.engine.inputs import Prompt
from nanoengine.lora.adapter import LoRAAdapter, load_adapter
from nanoengine.lora.layers import add_lora, add_lora_masked
from nanoengine.lora.manager import LoRAManager
from nanoengine.lora.synthetic import write_random_adapter
from nanoengine.model import load_model
from nanoengine.request import Request
from nanoengine.scheduler import Scheduler
from nanoengine.scheduler.output import ScheduledRequest
from tests.lora_adapters import ADAPTERS, broken_copy, make_peft_adapter, merged_model, set_config
from tests.oracles import assert_same_greedy, hf_greedy

pytestmark = pytest.mark.l14

NAME = "llama-gqa"
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(30, 49)), [20, 21], [40, 41, 42, 43, 44], [7, 7, 7, 8]]
GREEDY = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(zoo_paths, tmp_path_factory):
    """``adapters(model)``: {id: LoRARequest} of PEFT adapters of zoo model ``model`` (made once)."""
    made = {}

    def make(model: str = NAME) -> dict[int, LoRARequest]:
        if model not in made:
            root = tmp_path_factory.mktemp(f"lora-{model}")
            made[model] = {
                lora_id: LoRARequest(f"adapter{lora_id}", lora_id, str(make_peft_adapter(
                    zoo_paths[model], root / f"a{lora_id}", targets, rank, alpha, rslora, seed=lora_id)))
                for lora_id, (targets, rank, alpha, rslora) in ADAPTERS.items()
            }
        return made[model]

    return make


def _lora_llm(path, max_loras=4, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", fast_path=False, enable_lora=True, max_loras=max_loras, **kwargs)


# -- L14.T1: reading a PEFT adapter ----------------------------------------------------------

@pytest.mark.l14_t1
def test_an_adapter_read_from_peft_files_adds_what_peft_merges(zoo_paths, adapters, ours):
    """For every projection: B (scaled) @ A == PEFT's merged weight - the base weight."""
    config = ours(NAME).hf_config
    base = merged_model(zoo_paths[NAME], None).state_dict()
    for lora_request in adapters().values():
        adapter = load_adapter(lora_request, config, max_lora_rank=8)
        merged = merged_model(zoo_paths[NAME], lora_request.lora_path).state_dict()
        targets = ADAPTERS[lora_request.lora_int_id][0]
        assert len(adapter.weights) == config.num_hidden_layers * len(targets)
        for (layer, module), (a, b) in adapter.weights.items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{layer}.{part}.{module}.weight"
            torch.testing.assert_close(b @ a, merged[name] - base[name], atol=2e-5, rtol=1e-4)


# -- L14.T2: adapter slots, least recently used out ------------------------------------------

def _random_adapter(config, lora_id: int, rank: int = 2) -> LoRAAdapter:
    from nanoengine.lora.adapter import projection_shapes

    generator = torch.Generator().manual_seed(lora_id)
    weights = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in projection_shapes(config).items():
            weights[(layer, module)] = (torch.randn(rank, fan_in, generator=generator),
                                        torch.randn(fan_out, rank, generator=generator))
    return LoRAAdapter(LoRARequest(f"r{lora_id}", lora_id, f"/nowhere/{lora_id}"), rank, weights)


@pytest.fixture
def manager(zoo_paths):
    """A manager with two slots over a fresh copy of the model (it wraps the layers in place),
    knowing adapters 1..4 (made here: nothing is read from disk)."""
    loaded = load_model(ModelConfig(model=str(zoo_paths[NAME]), dtype="float32"))
    manager = LoRAManager(loaded.model, loaded.hf_config, LoRAConfig(max_loras=2, max_lora_rank=4),
                          loaded.dtype, loaded.device)
    for lora_id in range(1, 5):
        manager.adapters[lora_id] = _random_adapter(loaded.hf_config, lora_id)
    return manager


def _slot_holds(manager: LoRAManager, slot: int, lora_id: int) -> bool:
    layer = manager.layers[(0, "self_attn.qkv_proj")]
    a_q = manager.adapters[lora_id].weights[(0, "q_proj")][0]
    return torch.equal(layer.lora_a[slot, : a_q.shape[0]], a_q)


@pytest.mark.l14_t2
def test_slots_fill_then_evict_the_least_recently_used_adapter_not_in_the_step(manager):
    first, second = manager.slot_for(1, {1}), manager.slot_for(2, {2})
    assert {first, second} == {0, 1}
    assert manager.slot_for(1, {1}) == first  # already there: 1 becomes the most recently used
    third = manager.slot_for(3, {3})  # 2 is the least recently used: it goes
    assert third == second and list(manager.slot_of) == [1, 3]
    assert _slot_holds(manager, third, 3) and _slot_holds(manager, first, 1)
    # 1 is least recently used, but the step uses it: 3 goes instead
    assert manager.slot_for(4, {1, 4}) == third and list(manager.slot_of) == [1, 4]
    assert _slot_holds(manager, third, 4)


@pytest.mark.l14_t2
def test_a_step_maps_each_requests_rows_to_its_adapters_slot(manager):
    def scheduled(request_id, num_tokens, lora_id):
        lora = None if lora_id is None else manager.adapters[lora_id].lora_request
        return ScheduledRequest(request_id, [1] * num_tokens, 0, [0], True, GREEDY, [], lora_request=lora)

    manager.prepare([scheduled("a", 3, 1), scheduled("b", 2, None), scheduled("c", 1, 2), scheduled("d", 2, 1)])
    segments = {slot: rows for slot, rows in manager.batch.segments}
    assert set(segments) == {manager.slot_of[1], manager.slot_of[2]}
    assert segments[manager.slot_of[1]].tolist() == [0, 1, 2, 6, 7]
    assert segments[manager.slot_of[2]] == slice(5, 6)
    own_slot = manager.batch.one_hot.argmax(1).tolist()
    assert manager.batch.one_hot.sum(1).tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
    assert [own_slot[i] for i in (0, 1, 2, 5, 6, 7)] == [manager.slot_of[i] for i in (1, 1, 1, 2, 1, 1)]
    manager.masked_max_row_slots = 8 * 2 - 1  # one row too many for the masked path
    manager.prepare([scheduled("a", 3, 1), scheduled("b", 2, None), scheduled("c", 1, 2), scheduled("d", 2, 1)])
    assert manager.batch.one_hot is None and len(manager.batch.segments) == 2
    manager.prepare([scheduled("b", 1, None)])
    assert manager.batch.segments == []
    with pytest.raises(RuntimeError, match="max_loras"):
        manager.prepare([scheduled("a", 1, 1), scheduled("c", 1, 2), scheduled("e", 1, 3)])


# -- L14.T3: each token through its own adapter ----------------------------------------------

def _random_step(row_slots, seed, contiguous_as_slices):
    """Random slots' weights, a batch, and its segments and one-hot mask for ``row_slots``."""
    generator = torch.Generator().manual_seed(seed)
    num_slots, rank, fan_in, fan_out = 3, 4, 8, 6
    lora_a = torch.randn(num_slots, rank, fan_in, generator=generator)
    lora_b = torch.randn(num_slots, rank, fan_out, generator=generator)  # B transposed
    x = torch.randn(len(row_slots), fan_in, generator=generator)
    y = torch.randn(len(row_slots), fan_out, generator=generator)
    segments = []
    for slot in sorted({s for s in row_slots if s is not None}):
        rows = [i for i, s in enumerate(row_slots) if s == slot]
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        segments.append((slot, slice(rows[0], rows[-1] + 1) if contiguous and contiguous_as_slices
                         else torch.tensor(rows)))
    k = max((s for s in row_slots if s is not None), default=-1) + 1
    one_hot = torch.zeros(len(row_slots), k)
    for i, slot in enumerate(row_slots):
        if slot is not None:
            one_hot[i, slot] = 1
    return lora_a, lora_b, x, y, segments, one_hot


row_slots_strategy = st.lists(st.sampled_from([None, 0, 1, 2]), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(row_slots_strategy, st.integers(0, 2**16), st.booleans())
@pytest.mark.l14_t3
def test_add_lora_gives_each_row_its_own_adapter(row_slots, seed, as_slices):
    lora_a, lora_b, x, y, segments, _ = _random_step(row_slots, seed, as_slices)
    expected = torch.stack([
        y[i] if slot is None else y[i] + lora_b[slot].T @ (lora_a[slot] @ x[i]) for i, slot in enumerate(row_slots)
    ])
    torch.testing.assert_close(add_lora(y.clone(), x, lora_a, lora_b, segments), expected)


@settings(max_examples=25, deadline=None)
@given(row_slots_strategy.filter(lambda slots: any(s is not None for s in slots)), st.integers(0, 2**16))
@pytest.mark.l14_t3
def test_the_masked_path_adds_what_the_gather_and_matmul_adds(row_slots, seed):
    lora_a, lora_b, x, y, segments, one_hot = _random_step(row_slots, seed, True)
    torch.testing.assert_close(add_lora_masked(y.clone(), x, lora_a, lora_b, one_hot),
                               add_lora(y.clone(), x, lora_a, lora_b, segments))


# -- the whole engine ------------------------------------------------------------------------

@pytest.mark.parametrize("max_loras, path", [(4, "masked"), (4, "gather"), (2, "gather")])
def test_a_batch_mixing_adapters_and_the_base_model_matches_each_peft_merged_model(
    max_loras, path, zoo_paths, adapters
):
    """Three adapters and the base model, two requests each, added at once: each request's
    greedy tokens are those of PEFT's merged model for its adapter, on the masked path
    (every step here is small) and on the gather-and-matmul path. With two slots, the
    scheduler runs at most two adapters a step and the slots are reused."""
    loras = [*adapters().values(), None]
    requests = [loras[i % len(loras)] for i in range(len(PROMPTS) + 2)]
    prompts = (PROMPTS + PROMPTS)[: len(requests)]
    llm = _lora_llm(zoo_paths[NAME], max_loras, trace=True)
    if path == "gather":
        llm.llm_engine.runner.lora.masked_max_row_slots = 0
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=requests)
    base_tokens = {}
    for prompt, lora, output in zip(prompts, requests, outputs):
        model = merged_model(zoo_paths[NAME], None if lora is None else lora.lora_path)
        theirs = hf_greedy(model, prompt, GREEDY.max_tokens)
        assert output.lora_request == lora
        assert_same_greedy(model, prompt, output.outputs[0].token_ids, theirs)
        if lora is None:
            base_tokens[tuple(prompt)] = theirs
    changed = [o.outputs[0].token_ids != base_tokens.get(tuple(p)) for p, r, o in zip(prompts, requests, outputs)
               if r is not None and tuple(p) in base_tokens]
    assert changed and all(changed), "an adapter left the base model's tokens unchanged: the test would be blind"
    per_step: dict[int, set] = {}
    for event in llm.llm_engine.trace.events:
        if event.kind == "schedule":
            per_step.setdefault(event.step, set()).add(requests[int(event.request_id)])
    assert max(len(loras_ - {None}) for loras_ in per_step.values()) == min(max_loras, 3)


def test_prefix_caching_never_serves_a_block_computed_under_another_adapter(zoo_paths, adapters):
    """The same long prompt under adapter 1, adapter 2, the base model, then adapter 1 again:
    only the last reuses blocks (adapter 1's), and every output is what it is alone."""
    one, two = adapters()[1], adapters()[2]
    prompt = {"prompt_token_ids": list(range(40, 80))}
    llm = _lora_llm(zoo_paths[NAME], block_size=4)
    stats = llm.llm_engine.kv_cache_manager.stats
    hits = []
    outputs = []
    for lora in (one, two, None, one):
        before = stats.hit_blocks
        outputs.append(llm.generate(prompt, GREEDY, lora_request=lora)[0].outputs[0].token_ids)
        hits.append(stats.hit_blocks - before)
    assert hits[:3] == [0, 0, 0] and hits[3] == (40 - 1) // 4
    assert outputs[3] == outputs[0]
    for lora, tokens in zip((one, two, None), outputs):
        model = merged_model(zoo_paths[NAME], None if lora is None else lora.lora_path)
        assert_same_greedy(model, prompt["prompt_token_ids"], tokens, hf_greedy(model, prompt["prompt_token_ids"], 8))


def test_block_hashes_include_the_adapter_and_forks_inherit_it():
    kv = KVCacheManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    kv.set_extra_keys("a", LoRARequest("x", 1, "/x").cache_keys)
    assert kv.allocate_slots("a", tokens)
    assert kv.get_computed_blocks(tokens) == []
    assert kv.get_computed_blocks(tokens, LoRARequest("y", 2, "/y").cache_keys) == []
    assert kv.get_computed_blocks(tokens, LoRARequest("x", 1, "/x").cache_keys) == kv.block_table("a")[:2]
    kv.fork("a", "a0")
    assert kv.extra_keys["a0"] == kv.extra_keys["a"]
    kv.forget("a")
    assert "a" not in kv.extra_keys


def test_the_scheduler_never_runs_more_than_max_loras_adapters_in_a_step():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(kv, token_budget=64, max_num_seqs=8, max_loras=2)
    lora_ids = [1, 2, 3, None, 1, 3, None, 2]
    for i, lora_id in enumerate(lora_ids):
        lora = None if lora_id is None else LoRARequest(f"l{lora_id}", lora_id, f"/l{lora_id}")
        scheduler.add_request(Request(str(i), None, [1, 2, 3], GREEDY, frozenset(), 0.0, lora_request=lora))
    admitted_order = []
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        plan = scheduler.schedule()
        adapters = {s.lora_request.lora_int_id for s in plan.scheduled if s.lora_request is not None}
        assert len(adapters) <= 2
        scheduler.update_after_step(plan)
        for s in plan.scheduled:
            request = scheduler.requests[s.request_id]
            if s.num_computed_tokens == 0:
                admitted_order.append(int(s.request_id))
            request.output_token_ids.append(9)
            if len(request.output_token_ids) == 2:
                scheduler.finish_request(s.request_id)
    assert not scheduler.has_unfinished_requests()
    assert admitted_order[:3] == [0, 1, 3]  # request 2's adapter waits; the base request does not
    assert sorted(admitted_order) == list(range(len(lora_ids)))


def test_a_generated_adapter_is_read_by_peft_and_applied_as_peft_applies_it(zoo_paths, ours, tmp_path):
    path = write_random_adapter(ours(NAME).hf_config, tmp_path / "random", rank=4, target_modules=["q_proj", "down_proj"],
                                seed=3, std=0.5)
    model = merged_model(zoo_paths[NAME], path)
    llm = _lora_llm(zoo_paths[NAME])
    prompt = PROMPTS[0]
    ours_tokens = llm.generate({"prompt_token_ids": prompt}, GREEDY, lora_request=LoRARequest("r", 7, str(path)))
    assert_same_greedy(model, prompt, ours_tokens[0].outputs[0].token_ids, hf_greedy(model, prompt, 8))


@pytest.mark.parametrize("edit, complaint", [
    (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (set_config(r=64), "rank 64, above max_lora_rank"),
    (set_config(use_dora=True), "DoRA"),
    (set_config(bias="all"), "trains biases"),
    (set_config(peft_type="PREFIX_TUNING"), "not LoRA"),
])
def test_a_bad_adapter_is_refused_by_name_and_harms_no_request_in_flight(edit, complaint, zoo_paths, adapters,
                                                                          tmp_path):
    llm = _lora_llm(zoo_paths[NAME])
    engine = llm.llm_engine
    good = adapters()[2]
    engine.add_request("running", Prompt(None, PROMPTS[0]), GREEDY, lora_request=good)
    engine.step()
    bad = LoRARequest("bad", 9, broken_copy(good.lora_path, tmp_path, edit))
    with pytest.raises(ValueError, match=complaint):
        engine.add_request("bad", Prompt(None, PROMPTS[1]), GREEDY, lora_request=bad)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    model = merged_model(zoo_paths[NAME], good.lora_path)
    assert [o.request_id for o in finished] == ["running"]
    assert_same_greedy(model, PROMPTS[0], finished[0].outputs[0].token_ids, hf_greedy(model, PROMPTS[0], 8))


def test_adapters_of_another_model_or_engines_without_lora_are_refused(zoo_paths, adapters):
    other = adapters("qwen3-qknorm")[2]
    llm = _lora_llm(zoo_paths[NAME])
    with pytest.raises(ValueError, match=r"this model needs A"):
        llm.generate("hello", GREEDY, lora_request=other)
    with pytest.raises(ValueError, match="is not a directory"):
        llm.add_lora(LoRARequest("gone", 5, str(zoo_paths[NAME] / "missing")))
    with pytest.raises(ValueError, match="already adapter"):
        llm.add_lora(adapters()[1]) and llm.add_lora(LoRARequest("same id", 1, adapters()[2].lora_path))
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLM(str(zoo_paths[NAME]), dtype="float32", fast_path=False).generate("hi", GREEDY,
                                                                          lora_request=adapters()[1])
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("x", 0, "/x")


def test_an_adapter_removed_while_its_request_runs_stays_until_that_request_ends(zoo_paths, adapters):
    llm = _lora_llm(zoo_paths[NAME])
    engine, lora = llm.llm_engine, adapters()[1]
    engine.add_request("r", Prompt(None, PROMPTS[2]), GREEDY, lora_request=lora)
    engine.step()
    assert engine.list_loras() == {1} and engine.remove_lora(1) and engine.list_loras() == set()
    assert not engine.remove_lora(1)
    with pytest.raises(ValueError, match="need an engine started with enable_lora"):
        LLM(str(zoo_paths[NAME]), dtype="float32", fast_path=False).llm_engine.add_lora(lora)
    tokens = None
    while engine.has_unfinished_requests():
        assert 1 in engine.runner.lora.adapters  # its weights stay while it runs
        for output in engine.step():
            tokens = output.outputs[0].token_ids
    assert 1 not in engine.runner.lora.adapters  # and go with it
    model = merged_model(zoo_paths[NAME], lora.lora_path)
    assert_same_greedy(model, PROMPTS[2], tokens, hf_greedy(model, PROMPTS[2], 8))
    assert engine.add_lora(lora) and engine.list_loras() == {1}
