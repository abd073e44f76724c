"""Lesson 12: tensor, pipeline and data parallelism.

The oracle is the engine on one rank: split across ranks, a model must give the same
greedy tokens (the sums run in another order, so logits agree to rounding, and the zoo's
peaked logits make greedy choices stable). The layers are checked one by one against the
full matmul, on two real ranks (spawned processes talking over gloo). Data-parallel
replicas and a parallel engine behind the server need lesson 13's async engine: their
tests are in test_l13_async_engine.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import SamplingParams
from nanoengine.engine.inputs import Prompt
from nanoengine.model.layers.embedding import LMHead, VocabEmbedding
from nanoengine.model.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from nanoengine.parallel.executor import WorkerFailure, free_local_port
from nanoengine.parallel.state import ParallelGroup, RankLayout, building_for, split_evenly
from tests.parallel_ranks import GREEDY, PROMPTS, greedy_tokens, parallel_llm, run_ranks
from tests.zoo import build_model, build_tokenizer

pytestmark = pytest.mark.l12



@given(st.integers(1, 64), st.integers(1, 8))
def test_stages_split_the_layers_evenly_and_in_order(total, parts):
    pieces = [split_evenly(total, parts, i) for i in range(parts)]
    assert [n for piece in pieces for n in piece] == list(range(total))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_collectives_are_no_ops_on_one_rank():
    group, x = ParallelGroup(), torch.randn(3, 4)
    assert group.all_reduce(x) is x and group.all_gather(x) is x


# --- the layers, on two ranks -------------------------------------------------------------

def _row_linear() -> float:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(6, 8), torch.randn(6), torch.randn(3, 8)
    layer = RowLinear(8, 6, True, torch.float32)
    layer.weight_loader(layer.weight, weight)
    layer.weight_loader(layer.bias, bias)
    assert layer.weight.shape == (6, 4)
    rank = layer.tp.rank
    return (layer(x[:, rank * 4 : (rank + 1) * 4]) - F.linear(x, weight, bias)).abs().max().item()


def _column_linears() -> bool:
    torch.manual_seed(0)
    q, k, v = torch.randn(4 * 2, 8), torch.randn(2 * 2, 8), torch.randn(2 * 2, 8)  # 4 q heads, 2 kv heads, dim 2
    gate, up = torch.randn(10, 8), torch.randn(10, 8)
    qkv = QKVLinear(8, 2, 4, 2, False, torch.float32)
    gate_up = MergedColumnLinear(8, [10, 10], False, torch.float32)
    for shard, tensor in zip("qkv", (q, k, v)):
        qkv.weight_loader(qkv.weight, tensor, shard)
    gate_up.weight_loader(gate_up.weight, gate, "0")
    gate_up.weight_loader(gate_up.weight, up, "1")
    r = qkv.tp.rank
    return (
        (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
        and torch.equal(qkv.weight, torch.cat([q[r * 4 : r * 4 + 4], k[r * 2 : r * 2 + 2], v[r * 2 : r * 2 + 2]]))
        and torch.equal(gate_up.weight, torch.cat([gate[r * 5 : r * 5 + 5], up[r * 5 : r * 5 + 5]]))
    )


def _vocab_layer(part: str) -> float:
    torch.manual_seed(0)
    table, ids, hidden = torch.randn(11, 4), torch.tensor([0, 5, 6, 10, 3]), torch.randn(3, 4)
    layer = VocabEmbedding(11, 4, torch.float32) if part == "embedding" else LMHead(11, 4, torch.float32, None)
    layer.weight_loader(layer.weight, table)
    assert layer.weight.shape == (6, 4)  # 11 rows padded to 12, six a rank
    if part == "embedding":
        return (layer(ids) - table[ids]).abs().max().item()
    logits = layer(hidden)
    assert logits.shape == (3, 11)
    return (logits - hidden @ table.T).abs().max().item()


_LAYER_CHECKS = {"row": _row_linear, "column": _column_linears,
                 "embedding": lambda: _vocab_layer("embedding"), "head": lambda: _vocab_layer("head")}


def _check_layers(layout: RankLayout) -> dict[str, object]:
    """Every layer check on this rank, each built for ``layout``; a check that raises (a
    task not written yet) reports its error without stopping the others."""
    results = {}
    for name, check in _LAYER_CHECKS.items():
        try:
            with building_for(layout):
                results[name] = check()
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def layers_on_two_ranks() -> list[dict[str, object]]:
    """The layer checks, run once on two ranks (spawning processes is the slow part)."""
    return run_ranks(_check_layers, 2)


def _on_every_rank(results: list[dict[str, object]], name: str) -> list[object]:
    values = [r[name] for r in results]
    for value in values:
        assert not isinstance(value, str), value  # the rank's error
    return values


@pytest.mark.l12_t1
def test_a_row_parallel_linear_sums_to_the_full_matmul_on_every_rank(layers_on_two_ranks):
    assert max(_on_every_rank(layers_on_two_ranks, "row")) < 1e-5


def test_column_parallel_layers_hold_their_ranks_heads_and_rows(layers_on_two_ranks):
    assert all(_on_every_rank(layers_on_two_ranks, "column"))


@pytest.mark.l12_t2
def test_a_vocabulary_parallel_embedding_finds_every_row_once(layers_on_two_ranks):
    assert max(_on_every_rank(layers_on_two_ranks, "embedding")) < 1e-6


@pytest.mark.l12_t3
def test_a_vocabulary_parallel_head_gathers_every_logit_once(layers_on_two_ranks):
    assert max(_on_every_rank(layers_on_two_ranks, "head")) < 1e-5


# --- the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_vocab_model(tmp_path_factory):
    """A zoo Llama whose vocabulary (321) is not a multiple of the world size."""
    path = tmp_path_factory.mktemp("odd-vocab")
    tokenizer = build_tokenizer()
    build_model("llama-gqa", len(tokenizer) + 1, seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# tied embeddings run split in the pipeline test below (tp=2, pp=2)
@pytest.mark.parametrize("name", ["odd-vocab", "qwen2-bias", "qwen3-qknorm"])
def test_tensor_parallel_greedy_tokens_equal_one_rank(name, zoo_paths, odd_vocab_model):
    path = odd_vocab_model if name == "odd-vocab" else zoo_paths[name]
    want = greedy_tokens(parallel_llm(path))
    llm = parallel_llm(path, tp=2)
    try:
        assert llm.loaded.model.model.layers[0].self_attn.num_kv_heads == llm.loaded.hf_config.num_key_value_heads // 2
        assert greedy_tokens(llm) == want
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)])
def test_pipeline_stages_give_the_tokens_of_one_rank(tp, pp, zoo_paths):
    want = greedy_tokens(parallel_llm(zoo_paths["llama-tied"]))
    llm = parallel_llm(zoo_paths["llama-tied"], tp, pp)
    try:
        assert llm.loaded.model.model.num_local_layers == 1  # two layers, one a stage
        assert greedy_tokens(llm) == want
    finally:
        llm.shutdown()


def test_kv_heads_that_do_not_divide_are_refused_by_name(zoo_paths):
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) must be divisible by tensor_parallel_size"):
        parallel_llm(zoo_paths["mistral"], tp=2)
    assert not dist.is_initialized()


def test_a_dead_worker_fails_the_requests_in_flight_instead_of_hanging(zoo_paths):
    llm = parallel_llm(zoo_paths["llama-gqa"], tp=2)
    engine = llm.llm_engine
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", Prompt(None, prompt), SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        worker = engine.executor.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(WorkerFailure, match=r"rank 1 .* exited with code -9.*3 request\(s\) in flight failed"):
            engine.step()
        assert not engine.has_unfinished_requests()
        with pytest.raises(RuntimeError, match="rank 1"):
            engine.add_request("later", Prompt(None, [1, 2]), GREEDY)
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


def _cli(*args: str, launcher: list[str] | None = None) -> str:
    command = (launcher or [sys.executable, "-m"]) + ["nanoengine", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_torchrun_ranks_serve_one_driver_from_the_command_line(zoo_paths):
    args = ["generate", str(zoo_paths["llama-gqa"]), "--prompt", "The quick brown", "--temperature", "0",
            "--max-tokens", "8", "--dtype", "float32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_local_port()), "-m"]
    tp2 = _cli(*args, "--tensor-parallel-size", "2", "--distributed-executor-backend", "torchrun", launcher=torchrun)
    assert tp2.count("--- 'The quick brown'") == 1  # only the driver prints
    assert tp2 == _cli(*args)
