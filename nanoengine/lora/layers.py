"""Lesson 14: a linear layer that applies many LoRA adapters in one batch.

The base weight ``W`` is shared by every request. Each adapter adds its own low-rank
``B (A x)``, and a batch may mix requests for different adapters and the base model, so a
token must get its own request's adapter. Merging ``W + B A`` per adapter would need a
copy of the model per adapter and could not mix them in one step. Instead every adapter
loaded on the device sits in a *slot* of two stacked tensors, ``lora_a [slots, R, in]`` and
``lora_b [slots, out, R]``, and the step's :class:`LoRABatch` says which rows of the flat
batch use which slot. The layer runs the base matmul for all rows, then, for each slot the
step uses, gathers its rows, runs them through that slot's ``A`` and ``B``, and adds the
result back: a gather-and-matmul per adapter, not per request (S-LoRA's and Punica's idea).

A fused layer (q/k/v, gate/up) holds several projections' adapters side by side: its ``A``
stacks theirs (``R = projections × max_lora_rank`` rows) and its ``B`` is block-diagonal,
each projection's ``B`` writing only its own output columns.

A decode step has few rows, and there a gather-and-matmul per adapter costs more in call
overhead than in arithmetic. For such a step :func:`add_lora_masked` runs every row
through every slot in use at once (two matmuls per layer, however many adapters) and a
one-hot mask keeps each row's own slot; the manager picks it when rows × slots is small.
It computes exactly what :func:`add_lora` computes (the tests hold it to it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# A slot's rows in the flat batch: a slice when they are contiguous, else their indices.
Rows = slice | torch.Tensor


@dataclasses.dataclass(slots=True)
class LoRABatch:
    """Which rows of the step's flat batch run through which adapter slot.

    The one forward context of the LoRA layers: the runner sets it before every forward
    (:meth:`~nanoengine.lora.manager.LoRAManager.prepare`), and every :class:`LoRALinear`
    of the model reads the same object. Invariant: the segments' rows are disjoint; rows of
    base-model requests are in none of them. ``one_hot`` (``[T, k]``, or None): the same
    mapping as a mask over slots ``0 .. k-1``, set when the step runs the masked path.
    """

    segments: list[tuple[int, Rows]] = dataclasses.field(default_factory=list)
    one_hot: torch.Tensor | None = None


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             segments: list[tuple[int, Rows]]) -> torch.Tensor:
    """Add each row's adapter to the base output ``y [T, out]`` of input ``x [T, in]``, in place.

    ``lora_a [slots, R, in]`` holds every slot's ``A`` and ``lora_b [slots, R, out]`` every
    slot's ``B`` transposed (the scaling already in it); ``segments`` lists ``(slot, rows)``:
    for those rows, ``y += B_slot (A_slot x)``. Rows in no segment (base-model requests) keep ``y``.
    """
    # BEGIN SOLUTION L14.T3
    for slot, rows in segments:
        y[rows] += (x[rows] @ lora_a[slot].T) @ lora_b[slot]
    # END SOLUTION
    return y


def add_lora_masked(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    one_hot: torch.Tensor) -> torch.Tensor:
    """:func:`add_lora` for a step with few rows: every row through the ``A`` of each of the
    first ``k`` slots in one matmul (``[T, k·R]``), the mask ``one_hot [T, k]`` zeroing all
    but the row's own slot, then one matmul through the stacked ``B``."""
    k, rank = one_hot.shape[1], lora_a.shape[1]
    shrunk = x @ lora_a[:k].reshape(k * rank, -1).T
    shrunk = (shrunk.view(-1, k, rank) * one_hot.unsqueeze(-1)).view(-1, k * rank)
    y += shrunk @ lora_b[:k].reshape(k * rank, -1)
    return y


class LoRALinear(nn.Module):
    """A base linear layer plus ``max_loras`` adapter slots.

    ``modules`` are the checkpoint projections the base layer holds (``q_proj, k_proj,
    v_proj`` for a fused QKV), and ``output_slices`` where each one's outputs sit. Invariant:
    a slot holds one adapter or zeros; projection ``j``'s ``A`` fills rows
    ``j*max_rank .. j*max_rank + r`` of the slot's ``lora_a`` and its ``Bᵀ`` the same rows of
    ``lora_b``, only in its output slice, so one adapter's projections never mix.
    """

    def __init__(self, base_layer: nn.Module, modules: tuple[str, ...], output_slices: list[tuple[int, int]],
                 max_loras: int, max_lora_rank: int, batch: LoRABatch, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.modules_held, self.output_slices = modules, output_slices
        self.max_lora_rank = max_lora_rank
        self.batch = batch
        ranks = len(modules) * max_lora_rank
        out = sum(size for _, size in output_slices)
        self.register_buffer("lora_a", torch.zeros(max_loras, ranks, base_layer.input_size, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, ranks, out, dtype=dtype, device=device),
                             persistent=False)

    def set_slot(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Fill ``slot`` with one adapter: ``pairs[j]`` is projection ``j``'s ``(A [r, in], B [out_j, r])``,
        or None when the adapter leaves it alone."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for j, pair in enumerate(pairs):
            if pair is None:
                continue
            a, b = pair
            rank, (start, size) = a.shape[0], self.output_slices[j]
            first = j * self.max_lora_rank
            self.lora_a[slot, first : first + rank] = a
            self.lora_b[slot, first : first + rank, start : start + size] = b.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.batch.one_hot is not None:
            return add_lora_masked(y, x, self.lora_a, self.lora_b, self.batch.one_hot)
        if not self.batch.segments:
            return y
        return add_lora(y, x, self.lora_a, self.lora_b, self.batch.segments)
