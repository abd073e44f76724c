"""Starting a parallel world: the driver's side, and torchrun's other ranks (lesson 12).

With ``distributed_executor_backend="mp"`` the driver spawns its worker ranks itself. With
``"torchrun"`` every rank runs the same command, e.g. on two machines::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr HEAD --master-port 29500 \\
        -m nanoengine generate M --tensor-parallel-size 2 --distributed-executor-backend torchrun ...

(``--node-rank 1`` on the other machine). Rank 0 becomes the driver and carries on with the
command; every other rank serves as a worker inside :func:`start_parallel` and exits there
when the driver shuts down. Several CPU ranks on one machine should split its cores: torchrun
sets ``OMP_NUM_THREADS=1``; set ``NUMBA_NUM_THREADS`` to the same (the fast path's attention).
"""

from __future__ import annotations

import argparse
import os

from nanoengine.config import EXECUTOR_BACKENDS, ModelConfig, ParallelConfig
from nanoengine.parallel.executor import DistributedExecutor, run_worker


def start_parallel(config: ModelConfig, parallel: ParallelConfig, seed: int) -> DistributedExecutor | None:
    """The driver's executor over a ``parallel.world_size`` world, or None for one rank.

    Under torchrun, a rank other than 0 never returns: it works until the driver stops it,
    then exits its process.
    """
    if parallel.world_size == 1:
        return None
    if parallel.distributed_executor_backend == "torchrun":
        launched = int(os.environ.get("WORLD_SIZE", "0"))
        if launched != parallel.world_size:
            raise ValueError(f"torchrun started {launched or 'no'} ranks, but tensor_parallel_size x "
                             f"pipeline_parallel_size is {parallel.world_size}; start it with that many processes")
        rank = int(os.environ["RANK"])
        if rank != 0:
            run_worker(rank, config, parallel, "env://", seed)
            raise SystemExit(0)
    return DistributedExecutor(config, parallel, seed)


def add_parallel_arguments(parser: argparse.ArgumentParser, data_parallel: bool = False) -> None:
    """vLLM's parallelism flags (``--data-parallel-size`` only where a server balances replicas)."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="ranks that split every layer (lesson 12)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N",
                        help="pipeline stages that split the stack of layers (lesson 12)")
    if data_parallel:
        parser.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                            help="engine replicas behind the server, requests balanced across them (lesson 12)")
    parser.add_argument("--distributed-executor-backend", choices=list(EXECUTOR_BACKENDS), default="mp",
                        help="mp: spawn the ranks here; torchrun: join the ranks torchrun started")


def parallel_kwargs(args: argparse.Namespace) -> dict:
    """``LLM``'s parallelism arguments from the flags."""
    return dict(tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend)
