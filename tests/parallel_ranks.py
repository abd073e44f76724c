"""Running a function on every rank of a small gloo world, for tests of the parallel layers."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable

from nanoengine.parallel.executor import free_local_port
from nanoengine.parallel.state import init_distributed


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
