"""AWQ checkpoints (AutoAWQ's GEMM layout, 4-bit with zero points): read them, run them as int4.

AWQ scales the input channels that meet large activations up before rounding (and the
previous operation's output down to match), so the weights that matter most lose least; what
it saves is group-wise int4 with a zero point, packed into int32 words (``int32_packing.py``).
For a layer with ``K`` inputs, ``N`` outputs and ``G`` groups of ``group_size`` inputs:

- ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]``: each word holds eight
  consecutive outputs, *interleaved*: nibble ``j`` of word ``c`` is output ``8c + ORDER[j]``
  (an order that suits the GEMM kernel's unpacking into fp16 pairs);
- ``scales`` ``[G, N]``, fp16 on disk;
- ``w[n, k] = scale[g, n] * (q[k, n] - zero[g, n])`` with ``g = k // group_size``.

Inputs are always in order (AWQ has no act order). ``modules_to_not_convert`` names layers
the checkpoint keeps in float; a fused layer of ours is one matmul, so its parts must be
all kept or all quantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanoengine.model.layers.linear import LinearMethod, UnquantizedLinearMethod
from nanoengine.model.llama import LlamaForCausalLM
from nanoengine.quant.base import QuantizationConfig
from nanoengine.quant.int32_packing import VALUES_PER_WORD, PackedInt4Method, checked_group_size
from nanoengine.quant.int32_packing import checkpoint_parameter, require, unpack_int4

# nibble j of a word holds output ORDER[j] of its eight; nibble UNORDER[i] holds output i
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
UNORDER = tuple(ORDER.index(i) for i in range(VALUES_PER_WORD))

# our fused layer -> the checkpoint layers it stacks
FUSED_PARTS = {
    fused: [part for part, (target, _) in LlamaForCausalLM.stacked_params.items() if target == fused]
    for fused, _ in LlamaForCausalLM.stacked_params.values()
}


def unpack_awq_outputs(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N / 8]`` packed in AWQ's interleaved order -> uint8 ``[R, N]`` in output order."""
    values = unpack_int4(words, dim=1).view(words.shape[0], -1, VALUES_PER_WORD)
    return values[..., list(UNORDER)].flatten(1)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's ``qweight [K, N/8]``, ``qzeros [G, N/8]``, ``scales [G, N]`` -> (codes uint8
    ``[N, K]``, scales and mins float32 ``[N, G]``) with ``w = codes * scale + min``."""
    scales = scales.float()
    mins = -unpack_awq_outputs(qzeros).float() * scales
    return unpack_awq_outputs(qweight).t().contiguous(), scales.t().contiguous(), mins.t().contiguous()


class AWQConfig(QuantizationConfig):
    """A 4-bit GEMM-layout AWQ checkpoint (both Hugging Face's and AutoAWQ's key names)."""

    name = "awq"

    def __init__(self, group_size: int, modules_to_not_convert: list[str]) -> None:
        self.group_size, self.modules_to_not_convert = group_size, modules_to_not_convert

    @classmethod
    def from_checkpoint_config(cls, quantization_config: dict[str, Any]) -> AWQConfig:
        get = quantization_config.get
        require("AWQ", "bits", get("bits", get("w_bit")), (4,))
        require("AWQ", "version", str(get("version", "gemm")).lower(), ("gemm",))
        require("AWQ", "zero_point", get("zero_point", True), (True,))
        group_size = checked_group_size("AWQ", get("group_size", get("q_group_size", 128)))
        return cls(group_size, list(get("modules_to_not_convert") or []))

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod() if self.kept_in_float(prefix) else AWQLinearMethod(self.group_size)

    def kept_in_float(self, prefix: str) -> bool:
        """Whether ``modules_to_not_convert`` names the layer ``prefix`` (a fused layer: all its parts).

        A name matches as a substring of the checkpoint's module name, as Hugging Face matches it.
        """
        head, _, leaf = prefix.rpartition(".")
        parts = [f"{head}.{part}" for part in FUSED_PARTS.get(leaf, [leaf])]
        kept = [part for part in parts if any(name in part for name in self.modules_to_not_convert)]
        if kept and len(kept) < len(parts):
            raise ValueError(
                f"modules_to_not_convert keeps {kept} in float but not the rest of {parts}, "
                f"which nanoengine runs as one fused layer ({prefix})"
            )
        return bool(kept)


class AWQLinearMethod(PackedInt4Method):
    """Registers an AWQ layer's three tensors; after loading, runs them as an int4 weight."""

    checkpoint_params = ("qweight", "qzeros", "scales")

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        groups = self.groups(input_size, output_size)
        packed = output_size // VALUES_PER_WORD
        layer.qweight = checkpoint_parameter((input_size, packed), torch.int32, 1, VALUES_PER_WORD)
        layer.qzeros = checkpoint_parameter((groups, packed), torch.int32, 1, VALUES_PER_WORD)
        layer.scales = checkpoint_parameter((groups, output_size), dtype, output_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.finish(layer, *unpack_awq(layer.qweight.data, layer.qzeros.data, layer.scales.data))
