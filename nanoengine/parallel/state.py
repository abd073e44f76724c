"""Which ranks work together, and the collectives they run (lesson 12).

A rank of a ``tensor_parallel_size × pipeline_parallel_size`` world belongs to two groups:
its *tensor-parallel* group (the ranks of its pipeline stage, which split every layer of the
stage between them) and its *pipeline* group (one rank per stage, passing hidden states on).
Global rank ``r`` is stage ``r // tp``, tensor rank ``r % tp``, so the ranks of a stage are
neighbours (on a GPU machine: the GPUs with the fastest links between them).

A :class:`ParallelGroup` is one rank's view of one group. Its collectives are no-ops at size
1, so a model built for one rank runs exactly the code it ran before lesson 12.

Layers learn their group while the model is built (:func:`building_for` sets the layout
that :func:`current_layout` returns) and keep it, so nothing global is read in ``forward``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelGroup:
    """One rank's place in a group of ``size`` ranks.

    Invariant: ``ranks[rank]`` is this rank's global rank; ``group`` is the torch.distributed
    group of ``ranks``, None exactly when ``size == 1``.
    """

    rank: int = 0
    size: int = 1
    ranks: tuple[int, ...] = (0,)
    group: dist.ProcessGroup | None = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place (every rank gets the sum)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def send(self, x: torch.Tensor, to_rank: int) -> None:
        """Send ``x`` to the group's rank ``to_rank`` (pipeline stages pass hidden states)."""
        dist.send(x.contiguous(), dst=self.ranks[to_rank], group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, from_rank: int) -> torch.Tensor:
        """Receive a ``shape`` tensor from the group's rank ``from_rank``."""
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.ranks[from_rank], group=self.group)
        return x


@dataclasses.dataclass(frozen=True, slots=True)
class RankLayout:
    """Where one rank sits: its tensor-parallel group and its pipeline group.

    ``rank`` is the global rank; ``tp.rank`` its shard of every layer; ``pp.rank`` its stage.
    """

    tp: ParallelGroup = ParallelGroup()
    pp: ParallelGroup = ParallelGroup()
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp.size * self.pp.size


SINGLE = RankLayout()
_building: RankLayout = SINGLE


def current_layout() -> RankLayout:
    """The layout of the model being built (:data:`SINGLE` outside :func:`building_for`)."""
    return _building


@contextlib.contextmanager
def building_for(layout: RankLayout) -> Iterator[None]:
    """Build a model's layers for ``layout``: each layer reads its group once, here."""
    global _building
    previous, _building = _building, layout
    try:
        yield
    finally:
        _building = previous


def split_evenly(total: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(total)`` cut into ``parts`` contiguous pieces whose sizes
    differ by at most one (earlier pieces take the remainder): a stage's layers."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts``, refusing a split that would leave ranks with unequal shares."""
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({parts})")
    return total // parts


def rank_layout(tp_size: int, pp_size: int, rank: int) -> RankLayout:
    """Global rank ``rank``'s layout (stage ``rank // tp_size``) with no process group behind it:
    enough to build its share of a model (on ``meta``, or to load real weights), not to run it."""
    stage, shard = divmod(rank, tp_size)
    tp = ParallelGroup(shard, tp_size, tuple(range(stage * tp_size, (stage + 1) * tp_size)))
    pp = ParallelGroup(stage, pp_size, tuple(range(shard, tp_size * pp_size, tp_size)))
    return RankLayout(tp, pp, rank)


def init_distributed(
    rank: int, tp_size: int, pp_size: int, init_method: str, backend: str, timeout_s: float
) -> RankLayout:
    """Join the world (``tp_size * pp_size`` ranks) and build this rank's groups.

    Every rank creates every group, in the same order (torch.distributed requires it),
    then keeps the two it belongs to.
    """
    world = tp_size * pp_size
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    layout = rank_layout(tp_size, pp_size, rank)
    tp_groups = [rank_layout(tp_size, pp_size, stage * tp_size).tp.ranks for stage in range(pp_size)]
    pp_groups = [rank_layout(tp_size, pp_size, shard).pp.ranks for shard in range(tp_size)]
    tp_group = pp_group = None
    for ranks in tp_groups:
        group = dist.new_group(list(ranks)) if tp_size > 1 else None
        tp_group = group if ranks == layout.tp.ranks else tp_group
    for ranks in pp_groups:
        group = dist.new_group(list(ranks)) if pp_size > 1 else None
        pp_group = group if ranks == layout.pp.ranks else pp_group
    return dataclasses.replace(layout, tp=dataclasses.replace(layout.tp, group=tp_group),
                               pp=dataclasses.replace(layout.pp, group=pp_group))
