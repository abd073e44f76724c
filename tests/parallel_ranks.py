"""Helpers for the tests of parallel engines: a function run on every rank of a small gloo
world, and zoo models on one or several ranks compared by their greedy tokens."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable

from nanoengine import LLM, SamplingParams
from nanoengine.parallel.executor import free_local_port
from nanoengine.parallel.state import init_distributed

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 90], [100, 101, 7], list(range(40, 75))]
KV_BYTES = 1 << 21


def parallel_llm(path, tp: int = 1, pp: int = 1, **kwargs) -> LLM:
    """A float32 reference-path ``LLM`` over a zoo model on ``tp x pp`` ranks."""
    return LLM(str(path), dtype="float32", fast_path=False, kv_cache_memory_bytes=KV_BYTES,
               tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)


def greedy_tokens(llm: LLM) -> list[list[int]]:
    """The greedy tokens of every prompt of :data:`PROMPTS`."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _rank_main(fn: Callable, rank: int, world: int, init_method: str, results, args: tuple) -> None:
    import torch.distributed as dist

    try:
        layout = init_distributed(rank, world, 1, init_method, "gloo", 60)
        results.put((rank, True, fn(layout, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args) -> list:
    """``fn(layout, *args)`` on ``world`` tensor-parallel ranks (spawned processes); the
    results by rank. A rank that raises fails the caller with that rank's traceback.
    ``fn`` must be importable (a module-level function)."""
    init_method = f"tcp://127.0.0.1:{free_local_port()}"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(fn, rank, world, init_method, results, args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    by_rank, failures = {}, []
    try:
        for _ in range(world):
            rank, ok, value = results.get(timeout=120)
            (by_rank.__setitem__(rank, value) if ok else failures.append(f"rank {rank}:\n{value}"))
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [by_rank[rank] for rank in range(world)]
