"""Linear layers with the two seams later lessons need: a quantization method and sharding.

A layer never does its own matmul. It asks its ``LinearMethod`` to create the parameters and
to apply them, so that lesson 11 adds int8/int4/GGUF weights as one new method and no model
changes. Each layer also knows how the full weight is split across tensor-parallel ranks
(by output rows for column-parallel, by input columns for row-parallel), which lesson 12
turns on; until then ``tp_size`` is 1 and every layer holds the whole weight.

Fused layers (``QKVLinear``, ``MergedColumnLinear``) hold several checkpoint weights in one
matrix so a step runs one matmul instead of three; ``weight_loader`` takes a shard id saying
which part of the matrix a checkpoint tensor fills.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod(Protocol):
    """How a linear layer stores, loads and applies its weight (plain, or quantized: lesson 11).

    ``create_weights`` registers the parameters a checkpoint fills (for a quantized checkpoint
    these are its own tensors: ``qweight``, ``scales``…); ``load_weight`` copies one checkpoint
    tensor (or one shard of a fused layer) into them; ``process_weights_after_loading`` turns
    the loaded tensors into what ``apply`` runs on (packed for a kernel, quantized on the fly).
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None: ...

    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None: ...

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


def mark_sharded(param: nn.Parameter, output_dim: int, pack_factor: int = 1) -> nn.Parameter:
    """Say how a fused layer's shards split ``param``: along ``output_dim``, where each stored
    element holds ``pack_factor`` outputs (GPTQ's qzeros pack 8 int4 values per int32).

    A parameter left unmarked is the same for every shard (GPTQ's ``g_idx``) and is loaded whole.
    """
    param.output_dim, param.pack_factor = output_dim, pack_factor
    return param


def load_sharded(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
    """Copy a checkpoint tensor into ``param``, or into the slice of it that ``shard_id`` owns."""
    target = param.data
    output_dim = getattr(param, "output_dim", None)
    if shard_id is not None and output_dim is not None:
        start, size = layer.shard_offsets[shard_id]
        pack = param.pack_factor
        if start % pack or size % pack:
            raise ValueError(f"shard {shard_id!r} of {type(layer).__name__} does not align with {pack}-value packing")
        target = target.narrow(output_dim, start // pack, size // pack)
    _copy_checked(target, loaded)


class LinearMethodBase:
    """Loading that fits most methods (:func:`load_sharded`); nothing to do after loading."""

    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        load_sharded(layer, param, loaded, shard_id)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass


class FloatWeightMethod(LinearMethodBase):
    """A method that loads a dense float ``weight [output_size, input_size]`` from the checkpoint
    (the plain method keeps it; lesson 11's on-the-fly methods quantize it after loading)."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.weight = mark_sharded(
            nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False), output_dim=0
        )


class UnquantizedLinearMethod(FloatWeightMethod):
    """The plain path: the dense weight and ``F.linear``."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


def _check_tp_size(tp_size: int) -> None:
    if tp_size != 1:
        raise NotImplementedError("tensor-parallel sharding arrives with lesson 12; use tp_size=1")


class LinearBase(nn.Module):
    """A linear layer over this rank's slice of the weight.

    Invariant: ``weight`` has shape ``[output_size_per_rank, input_size_per_rank]``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        _check_tp_size(tp_size)
        self.input_size, self.output_size, self.tp_size = input_size, output_size, tp_size
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, output_size, dtype)
        self.bias = (
            mark_sharded(nn.Parameter(torch.zeros(output_size, dtype=dtype), requires_grad=False), output_dim=0)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        """Copy a checkpoint tensor into ``param``, refusing a shape that does not fit; the
        method loads its own parameters (a quantized checkpoint's tensors may need more care)."""
        if param is self.bias:
            load_sharded(self, param, loaded, shard_id)
        else:
            self.linear_method.load_weight(self, param, loaded, shard_id)


class ColumnLinear(LinearBase):
    """Output features split across ranks (q/k/v, gate/up): no communication after it."""


class RowLinear(LinearBase):
    """Input features split across ranks (o_proj, down_proj): the partial sums are all-reduced."""


class _FusedColumnLinear(ColumnLinear):
    """Several checkpoint matrices stacked by output rows; ``shard_offsets`` says where each goes."""

    shard_offsets: dict[str, tuple[int, int]]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            raise ValueError(f"{type(self).__name__} loads its weight in shards {list(self.shard_offsets)}")
        super().weight_loader(param, loaded, shard_id)


class QKVLinear(_FusedColumnLinear):
    """q, k and v projections as one matmul; shards ``"q"``, ``"k"``, ``"v"``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
        tp_size: int = 1,
    ) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, q_size + 2 * kv_size, bias, dtype, linear_method, tp_size)
        self.q_size, self.kv_size = q_size, kv_size
        self.shard_offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}


class MergedColumnLinear(_FusedColumnLinear):
    """Column layers that share an input stacked in one matmul; shards are ``"0"``, ``"1"``, …"""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
        tp_size: int = 1,
    ) -> None:
        super().__init__(input_size, sum(output_sizes), bias, dtype, linear_method, tp_size)
        starts = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shard_offsets = {str(i): (s, n) for i, (s, n) in enumerate(zip(starts, output_sizes))}


def _copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
    target.copy_(loaded)
