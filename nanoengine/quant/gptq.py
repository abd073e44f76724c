"""GPTQ checkpoints (AutoGPTQ's v1 layout, 4-bit): read their packed tensors, run them as int4.

GPTQ quantizes a trained model once, offline, rounding one input column at a time and
nudging the columns not yet rounded to absorb the error; what it saves is ordinary
group-wise int4 with a zero point, packed into int32 words (``int32_packing.py``). For a
layer with ``K`` inputs and ``N`` outputs, in ``G`` groups of ``group_size`` inputs (-1: one
group of all ``K``):

- ``qweight`` int32 ``[K / 8, N]``: word ``[i, n]`` holds the codes of inputs ``8i .. 8i+7``
  of output ``n`` (packed down the inputs, unlike everything else);
- ``qzeros`` int32 ``[G, N / 8]``: word ``[g, c]`` holds the zero points of outputs
  ``8c .. 8c+7``, each stored *minus one* (v1's quirk; the format's own kernels add the one
  back, so a nibble of 15 means a zero of 16);
- ``scales`` ``[G, N]``, fp16 on disk;
- ``g_idx`` int32 ``[K]``: the group of each input. In order (``i // group_size``) unless the
  model was quantized with ``desc_act`` ("act order": inputs rounded in decreasing order of
  their activations' size), where a group's inputs are scattered. Sorting the inputs by group gathers each
  group back into one contiguous run, so the int4 kernel applies after the activations'
  inputs are permuted the same way.

``w[n, k] = scale[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``. q/k/v (and
gate/up) are fused here into one layer: they read the same input, and one input order must
serve all of them, so their ``g_idx`` must agree; a checkpoint where they do not is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanoengine.model.layers.linear import load_sharded
from nanoengine.quant.base import QuantizationConfig
from nanoengine.quant.int32_packing import (
    VALUES_PER_WORD,
    PackedInt4Method,
    checked_group_size,
    checkpoint_parameter,
    require,
    unpack_int4,
)


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ v1's ``qweight [K/8, N]``, ``qzeros [G, N/8]``, ``scales [G, N]`` -> (codes uint8
    ``[N, K]`` in 0..15, scales and mins float32 ``[N, G]``), with ``w = codes * scale + min``
    for the inputs of each group in the order ``qweight`` stores them."""
    # BEGIN SOLUTION L11.T3
    codes = unpack_int4(qweight, dim=0).t()  # [K, N]: eight inputs per word
    zeros = unpack_int4(qzeros, dim=1).float() + 1  # [G, N]: eight outputs per word, stored minus one
    scales = scales.float()
    return codes.contiguous(), scales.t().contiguous(), (-zeros * scales).t().contiguous()
    # END SOLUTION


def act_order_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The input order that makes each group one contiguous run (None: ``g_idx`` already is in
    order). Refuses a ``g_idx`` that does not give every group exactly ``group_size`` inputs."""
    in_order = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    g_idx = g_idx.long()
    if torch.equal(g_idx, in_order):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], in_order):
        raise ValueError(f"g_idx does not assign exactly {group_size} inputs to each group")
    return perm


class GPTQConfig(QuantizationConfig):
    """A 4-bit GPTQ checkpoint; ``desc_act`` and ``sym`` need no setting here: ``g_idx`` and
    the stored zero points say all they change."""

    name = "gptq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    @classmethod
    def from_checkpoint_config(cls, quantization_config: dict[str, Any]) -> GPTQConfig:
        require("GPTQ", "bits", quantization_config.get("bits"), (4,))
        require("GPTQ", "checkpoint_format", quantization_config.get("checkpoint_format", "gptq"), ("gptq",))
        require("GPTQ", "lm_head", quantization_config.get("lm_head", False), (False,))
        return cls(checked_group_size("GPTQ", quantization_config.get("group_size", 128)))

    def linear_method(self, prefix: str) -> GPTQLinearMethod:
        return GPTQLinearMethod(self.group_size)


class GPTQLinearMethod(PackedInt4Method):
    """Registers a GPTQ layer's four tensors; after loading, runs them as an int4 weight."""

    checkpoint_params = ("qweight", "qzeros", "scales", "g_idx")

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        groups = self.groups(input_size, output_size)
        layer.qweight = checkpoint_parameter((input_size // VALUES_PER_WORD, output_size), torch.int32, output_dim=1)
        layer.qzeros = checkpoint_parameter(
            (groups, output_size // VALUES_PER_WORD), torch.int32, output_dim=1, pack_factor=VALUES_PER_WORD
        )
        layer.scales = checkpoint_parameter((groups, output_size), dtype, output_dim=1)
        # The same for every shard; -1 (no group) until the first shard's arrives.
        layer.g_idx = nn.Parameter(torch.full((input_size,), -1, dtype=torch.int32), requires_grad=False)

    def load_weight(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if param is layer.g_idx and bool((param >= 0).all()) and not torch.equal(param.data, loaded.to(param.dtype)):
            raise ValueError(
                f"g_idx of shard {shard_id!r} differs from the one already loaded into this fused "
                f"{type(layer).__name__}: its parts share one input, so they need the same act order"
            )
        load_sharded(layer, param, loaded, shard_id)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes, scales, mins = unpack_gptq(layer.qweight.data, layer.qzeros.data, layer.scales.data)
        perm = act_order_permutation(layer.g_idx.data, codes.shape[1] // scales.shape[1])
        self.finish(layer, codes if perm is None else codes[:, perm], scales, mins, perm)
