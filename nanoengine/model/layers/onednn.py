"""Lesson 15: bf16 weights prepacked for oneDNN, the CPU fast path's matmul.

``F.linear`` on a bfloat16 CPU tensor hands the weight to oneDNN, which first *reorders* it
into the blocked layout its AVX-512 BF16 kernels read, on every call. For a batch of one that
copy costs more than the matmul itself: a decode step reads each weight twice or more, and a
single stream runs at a fraction of the memory-bandwidth floor. Reordering each weight once,
at load time, and calling oneDNN's linear on the packed copy gives the same numbers (the same
kernel runs) without the per-call copy.

``pack_linear_weights(model)`` swaps the :class:`~nanoengine.model.layers.linear.LinearMethod`
of every plain bf16 linear layer (and the LM head) for :class:`OneDNNPackedLinearMethod`.
Invariant after packing: a packed layer holds ``packed_weight`` (an opaque oneDNN tensor,
``[out, in]``) and keeps its dense ``weight`` for anything that reads it (loaders, the
embedding the LM head is tied to), at the cost of a second copy of the weights in RAM.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoengine.model.layers.linear import LinearMethodBase, UnquantizedLinearMethod
from nanoengine.platform import cpu_has_native_bf16


def onednn_packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Packing pays off for bf16 on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX)
    whose PyTorch has oneDNN (mkldnn) built in. Elsewhere oneDNN has no bf16 kernel to pack
    for: on an AVX2-only CPU (AMD EPYC Zen 1) the reorder itself raises."""
    return (
        device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
        and cpu_has_native_bf16()
    )


class OneDNNPackedLinearMethod(LinearMethodBase):
    """Applies a weight prepacked by ``torch.ops.mkldnn._reorder_linear_weight``."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        raise TypeError("OneDNNPackedLinearMethod packs loaded weights; build the layer with the plain method")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")


def pack_linear_weights(model: nn.Module) -> int:
    """Prepack every plain linear layer's weight for oneDNN; returns how many were packed.

    Call after the weights are loaded (the packed copy does not follow later writes).
    """
    packed = 0
    # BEGIN SOLUTION L15.T2
    for module in model.modules():
        if isinstance(getattr(module, "linear_method", None), UnquantizedLinearMethod):
            # The batch-size hint only tunes the layout; 1 suits decode, larger batches run as fast.
            module.register_buffer(
                "packed_weight", torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1), persistent=False
            )
            module.linear_method = OneDNNPackedLinearMethod()
            packed += 1
    # END SOLUTION
    return packed
