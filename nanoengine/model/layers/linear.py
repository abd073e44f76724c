"""Linear layers with the two seams later lessons need: a quantization method and sharding.

A layer never does its own matmul. It asks its ``LinearMethod`` to create the parameters and
to apply them, so that lesson 11 adds int8/int4/GGUF weights as one new method and no model
changes. Each layer also knows how the full weight is split across tensor-parallel ranks
(lesson 12): a column-parallel layer keeps its rank's output rows and needs no communication;
a row-parallel layer keeps its rank's input columns, so each rank computes a partial sum and
the group all-reduces it. Built outside a parallel world, a layer holds the whole weight.

Fused layers (``QKVLinear``, ``MergedColumnLinear``) hold several checkpoint weights in one
matrix so a step runs one matmul instead of three; ``weight_loader`` takes a shard id saying
which part of the matrix a checkpoint tensor fills.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.parallel.state import ParallelGroup, current_layout, divide


# Up to this many rows a step's matmul counts as decode-sized: lesson 15's CPU kernels (the
# GEMV of ``cpu_gemv``, the GGUF codes of ``quant/grouped_gemv``) take it. Measured on an AMD
# EPYC Zen 1: at 16 rows the float32 GEMV is still ~1.4x ``F.linear``; at 64 MKL's GEMM wins.
DECODE_MAX_ROWS = 16


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


def mark_sharded(
    param: nn.Parameter, output_dim: int, pack_factor: int = 1, input_dim: int | None = None
) -> nn.Parameter:
    """Say how shards split ``param``: a fused layer's shards and column-parallel ranks along
    ``output_dim``, where each stored element holds ``pack_factor`` outputs (GPTQ's qzeros pack
    8 int4 values per int32); row-parallel ranks along ``input_dim`` (None: the tensor cannot
    be split by input, so a row-parallel layer refuses to shard it).

    A parameter left unmarked is the same for every shard (GPTQ's ``g_idx``) and is loaded whole.
    """
    param.output_dim, param.pack_factor, param.input_dim = output_dim, pack_factor, input_dim
    return param


def rank_slice(loaded: torch.Tensor, dim: int, tp: ParallelGroup, what: str) -> torch.Tensor:
    """This rank's equal share of ``loaded`` along ``dim`` (a view: nothing is copied)."""
    size = divide(loaded.shape[dim], tp.size, what)
    return loaded.narrow(dim, tp.rank * size, size)


def load_sharded(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
    """Copy this rank's part of a checkpoint tensor into ``param``, or into the slice of it that
    ``shard_id`` owns. The checkpoint tensor is whole; a tensor-parallel layer narrows it to
    its rank's rows (column-parallel) or columns (row-parallel) before copying."""
    target = param.data
    output_dim = getattr(param, "output_dim", None)
    tp: ParallelGroup = getattr(layer, "tp", ParallelGroup())
    if tp.size > 1 and layer.split == "output" and output_dim is not None:
        loaded = rank_slice(loaded, output_dim, tp, f"{type(layer).__name__}'s output size")
    elif tp.size > 1 and layer.split == "input" and param is not getattr(layer, "bias", None):
        input_dim = getattr(param, "input_dim", None)
        if input_dim is None:
            raise ValueError(f"{type(layer).__name__} cannot split this weight by input across ranks")
        loaded = rank_slice(loaded, input_dim, tp, f"{type(layer).__name__}'s input size")
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
            nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False),
            output_dim=0, input_dim=1,
        )


class UnquantizedLinearMethod(FloatWeightMethod):
    """The plain path: the dense weight and ``F.linear``."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """A linear layer over this rank's slice of the weight.

    ``split`` says which side of the full weight the ranks of its tensor-parallel group
    (``tp``, read from the layout the model is built for) divide: ``"output"`` or ``"input"``.
    Invariant: ``input_size`` and ``output_size`` are this rank's, so a plain weight has shape
    ``[output_size, input_size]``; a bias always has the full output of this rank.
    """

    split: str = "output"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.tp = current_layout().tp
        name = type(self).__name__
        if self.split == "output":
            output_size = divide(output_size, self.tp.size, f"{name}'s output size")
        else:
            input_size = divide(input_size, self.tp.size, f"{name}'s input size")
        self.input_size, self.output_size = input_size, output_size
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
    """Output features split across ranks (q/k/v, gate/up): each rank computes its own
    outputs in full, so no communication follows."""


class RowLinear(LinearBase):
    """Input features split across ranks (o_proj, down_proj): each rank multiplies its slice
    of the input by its columns, a partial sum of the whole output, which the group
    all-reduces. The bias is added once, by tensor rank 0, before the sum."""

    split = "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.linear_method.apply(self, x, self.bias)
        # BEGIN SOLUTION L12.T1
        partial = self.linear_method.apply(self, x, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(partial)
        # END SOLUTION


class _FusedColumnLinear(ColumnLinear):
    """Several checkpoint matrices stacked by output rows; ``shard_offsets`` says where each goes."""

    shard_offsets: dict[str, tuple[int, int]]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            raise ValueError(f"{type(self).__name__} loads its weight in shards {list(self.shard_offsets)}")
        super().weight_loader(param, loaded, shard_id)


class QKVLinear(_FusedColumnLinear):
    """q, k and v projections as one matmul; shards ``"q"``, ``"k"``, ``"v"``.

    Tensor-parallel ranks split it by heads: each keeps ``num_heads / tp`` query heads and
    ``num_kv_heads / tp`` KV heads (a GQA group never straddles two ranks), so attention
    runs on each rank with no communication. ``num_heads`` and ``num_kv_heads`` are this rank's.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
    ) -> None:
        tp_size = current_layout().tp.size
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, (q_size + 2 * kv_size) * tp_size, bias, dtype, linear_method)
        self.q_size, self.kv_size = q_size, kv_size
        self.shard_offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}


class MergedColumnLinear(_FusedColumnLinear):
    """Column layers that share an input stacked in one matmul; shards are ``"0"``, ``"1"``, …
    Each tensor-parallel rank keeps its share of every one of them (its gate rows and the
    matching up rows), so ``silu(gate) * up`` pairs the right rows on every rank."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        linear_method: LinearMethod | None = None,
    ) -> None:
        tp_size = current_layout().tp.size
        output_sizes = [divide(n, tp_size, f"{type(self).__name__}'s output size") for n in output_sizes]
        super().__init__(input_size, sum(output_sizes) * tp_size, bias, dtype, linear_method)
        starts = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shard_offsets = {str(i): (s, n) for i, (s, n) in enumerate(zip(starts, output_sizes))}


def _copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
    target.copy_(loaded)
