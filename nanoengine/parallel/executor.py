"""Lesson 12: one engine step on every rank of a tensor/pipeline-parallel world.

The engine's process is rank 0, the *driver*: it schedules, and it holds the first share of
the first pipeline stage, whose runner samples. The other ranks are worker processes (spawned
here, or started by torchrun beside the driver; see ``nanoengine.parallel.launch``). Each
step the driver broadcasts the ``SchedulerOutput`` to every rank over a gloo group, as a
``PlanDelta`` (only what changed since the last step; each rank rebuilds the plan); every
rank runs the step on its share (the model's own collectives keep them in lockstep), and
the driver returns its own runner's output: the sampled tokens are read on rank 0.

Before each broadcast the driver looks at its spawned workers: one that has exited turns
into :class:`WorkerFailure`, naming the rank and how it ended, and the engine fails the
requests in flight instead of waiting. (A send to a dead peer does not reliably fail at once:
gloo may wait for it to complete.) A rank that dies mid-collective, hangs, or was started by
torchrun, where the driver holds no process to look at, is caught by the broken connection
or by the collectives' timeout, ``ParallelConfig.timeout_s``, which the control group
shares.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import sys
import traceback
from typing import Protocol

import torch
import torch.distributed as dist

from nanoengine.config import ModelConfig, ParallelConfig
from nanoengine.model.loader import LoadedModel, load_model
from nanoengine.parallel.state import RankLayout, init_distributed
from nanoengine.platform import resolve_device
from nanoengine.scheduler.output import SchedulerOutput
from nanoengine.scheduler.plan_delta import PlanDecoder, PlanEncoder
from nanoengine.worker.model_runner import ModelRunner, ModelRunnerOutput, runner_for

logger = logging.getLogger("nanoengine")


class WorkerFailure(RuntimeError):
    """A rank of the parallel world died or stopped answering; the engine cannot go on."""


class Executor(Protocol):
    """Runs a scheduled step wherever the model lives and returns rank 0's output."""

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    """One rank: the engine's own runner runs the step."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        pass


def _broadcast(obj: object, group: dist.ProcessGroup) -> object:
    """Rank 0's ``obj`` on every rank (pickled; the others pass None)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def free_local_port() -> int:
    """A TCP port free on this machine now (for a world's rendezvous on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_for(config: ModelConfig) -> str:
    return "nccl" if resolve_device(config.device).type == "cuda" else "gloo"


def use_cpu_threads(threads: int) -> int:
    """Run torch's and numba's thread pools (the fast path's attention) on ``threads`` threads;
    returns the count before. Ranks that share a machine's cores must split them: with a full
    pool each, they fight for every core, and a rank waiting in a collective waits for the
    slowest."""
    import numba

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return previous


def _join_world(rank: int, config: ModelConfig, parallel: ParallelConfig, init_method: str) -> tuple[RankLayout, dist.ProcessGroup]:
    """Join the world, pin this rank to its GPU (or its share of the CPU cores), and make the
    gloo group the control messages travel on (every rank, in the same order)."""
    if _backend_for(config) == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        use_cpu_threads(max(1, (os.cpu_count() or 1) // parallel.world_size))
    layout = init_distributed(
        rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size, init_method, _backend_for(config),
        parallel.timeout_s,
    )
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=parallel.timeout_s))
    return layout, control


def run_worker(rank: int, config: ModelConfig, parallel: ParallelConfig, init_method: str, seed: int) -> None:
    """A worker rank: load this rank's share, build its KV cache when the driver says how
    large, then run every plan the driver broadcasts until it broadcasts None."""
    try:
        layout, control = _join_world(rank, config, parallel, init_method)
        loaded = load_model(config, layout)
        start = _broadcast(None, control)
        if start is not None:
            num_blocks, block_size = start
            runner = runner_for(loaded, num_blocks, block_size, seed)
            decoder = PlanDecoder()
            while (delta := _broadcast(None, control)) is not None:
                runner.execute(decoder.decode(delta))
    except Exception:  # the driver sees a broken connection; the reason is printed here
        print(f"nanoengine rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedExecutor:
    """The driver's side of a parallel world: rank 0, plus the worker ranks.

    ``"mp"`` spawns the workers on this machine; ``"torchrun"`` joins the ranks torchrun
    started (it reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from the environment), for a
    world that spans machines. Invariant: after :meth:`start`, every rank holds a runner
    over a KV cache of the same number of blocks, and each ``execute`` reaches every rank.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelConfig, seed: int) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed world; "
                               "shut the other parallel engine down first (llm.shutdown())")
        self.parallel = parallel
        self.workers: list[multiprocessing.Process] = []
        self.failed: str | None = None
        self._threads = torch.get_num_threads()  # the driver's pools shrink to its share; restored at shutdown
        if parallel.distributed_executor_backend == "torchrun":
            init_method = "env://"
        else:
            init_method = f"tcp://127.0.0.1:{free_local_port()}"
            self._spawn_workers(config, parallel, init_method, seed)
        try:
            self.layout, self.control = _join_world(0, config, parallel, init_method)
            self.loaded: LoadedModel = load_model(config, self.layout)
        except Exception:
            self.shutdown()
            raise
        self.runner: ModelRunner | None = None
        self.encoder = PlanEncoder()

    def _spawn_workers(self, config: ModelConfig, parallel: ParallelConfig, init_method: str, seed: int) -> None:
        """Start ranks 1.. as processes. numba sizes its thread pool once, at import, and an
        idle pool still spins: so each worker starts with its share of the cores in
        ``NUMBA_NUM_THREADS`` (measured: a TP=2 decode step 3.5x faster on two cores)."""
        context = multiprocessing.get_context("spawn")
        saved = os.environ.get("NUMBA_NUM_THREADS")
        os.environ["NUMBA_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel.world_size))
        try:
            for rank in range(1, parallel.world_size):
                process = context.Process(target=run_worker, args=(rank, config, parallel, init_method, seed),
                                          name=f"nanoengine-rank{rank}", daemon=True)
                process.start()
                self.workers.append(process)
        finally:
            if saved is None:
                del os.environ["NUMBA_NUM_THREADS"]
            else:
                os.environ["NUMBA_NUM_THREADS"] = saved

    def start(self, runner: ModelRunner, num_blocks: int, block_size: int) -> None:
        """Have every worker build its runner over ``num_blocks`` blocks; ``runner`` is ours."""
        self._send((num_blocks, block_size))
        self.runner = runner

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        self._send(self.encoder.encode(plan))
        try:
            return self.runner.execute(plan)
        except RuntimeError as exc:
            raise self._failure(exc) from None

    def _send(self, message: object) -> None:
        if self.failed:
            raise WorkerFailure(self.failed)
        if self._a_worker_exited():
            raise self._failure(None)
        try:
            _broadcast(message, self.control)
        except RuntimeError as exc:
            raise self._failure(exc) from None

    def _a_worker_exited(self) -> bool:
        return any(process.exitcode is not None for process in self.workers)

    def _failure(self, exc: Exception | None) -> WorkerFailure:
        """Name what went wrong: a worker that exited, else the collective's own error."""
        for process in self.workers:
            process.join(timeout=1.0)
        dead = [f"rank {rank} ({p.name}) exited with code {p.exitcode}"
                for rank, p in enumerate(self.workers, start=1) if p.exitcode is not None]
        reason = "; ".join(dead) if dead else f"a collective failed: {str(exc).splitlines()[0]}"
        self.failed = f"a parallel worker failed ({reason}); the engine has stopped"
        return WorkerFailure(self.failed)

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them (kill stragglers), leave the world."""
        if dist.is_initialized():
            if not self.failed and not self._a_worker_exited():
                try:
                    _broadcast(None, self.control)
                except (RuntimeError, AttributeError):
                    pass
            dist.destroy_process_group()
        for process in self.workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        use_cpu_threads(self._threads)
