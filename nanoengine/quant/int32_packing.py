"""What GPTQ and AWQ checkpoints share: 4-bit values packed eight to an int32 word.

Both formats store each weight's 4-bit code, and each group's integer zero point, eight to
an int32, lowest nibble first: value ``j`` of a word sits in bits ``4j .. 4j+3``. They differ
in which axis a word's eight values run along and in what order (see ``gptq.py`` and
``awq.py``), not in the bits. PyTorch has no uint32, so the words arrive as int32 and a right
shift drags the sign bit along; masking with ``0xF`` keeps only the nibble asked for.

After loading, :class:`PackedInt4Method` unpacks a layer's words into the codes, scales and
mins of an :class:`~nanoengine.quant.int4_kernel.Int4Weight` (``w = q * scale + min``, an
integer zero ``z`` being ``min = -z * scale``) and drops the checkpoint's tensors, so both
formats run on the same group-wise int4 matmul as ``quantization="int4"``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from nanoengine.model.layers.linear import LinearMethodBase, mark_sharded
from nanoengine.quant.int4_kernel import Int4Weight

VALUES_PER_WORD = 8


def unpack_int4(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 ``words`` -> uint8 values in 0..15, eight times as many along ``dim``: value ``j``
    of the word at index ``i`` lands at index ``8 * i + j``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.movedim(dim, -1)[..., None] >> shifts) & 0xF
    return nibbles.flatten(-2).movedim(-1, dim).to(torch.uint8)


def require(method: str, field: str, value: object, supported: Collection[object]) -> None:
    """Refuse a checkpoint setting nanoengine cannot run, naming the field and its value."""
    if value not in supported:
        wanted = " or ".join(repr(v) for v in supported)
        raise ValueError(f"{method} checkpoint has {field}={value!r}; nanoengine reads only {field}={wanted}")


def checked_group_size(method: str, group_size: object) -> int:
    """A checkpoint's ``group_size``: a positive number of inputs, or -1 for one group over all."""
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"{method} checkpoint has group_size={group_size!r}; expected a positive int or -1")
    return group_size


def checkpoint_parameter(
    shape: tuple[int, ...], dtype: torch.dtype, output_dim: int, pack_factor: int = 1
) -> nn.Parameter:
    """An empty tensor for the checkpoint to fill, split between a fused layer's shards along
    ``output_dim`` (where each element holds ``pack_factor`` outputs)."""
    return mark_sharded(nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False), output_dim, pack_factor)


class PackedInt4Method(LinearMethodBase):
    """A layer whose checkpoint holds packed 4-bit codes, run as an :class:`Int4Weight`.

    Subclasses register the checkpoint's parameters (``checkpoint_params``, with ``scales``
    in the model's dtype among them) and, after loading, unpack them and call :meth:`finish`.
    ``input_perm`` (or None) reorders the activations' inputs before the matmul, for codes
    whose groups were made contiguous by reordering the inputs (GPTQ's act order).
    """

    checkpoint_params: tuple[str, ...]

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def groups(self, input_size: int, output_size: int) -> int:
        """How many groups each output row has; refuses sizes the packing cannot split."""
        group_size = input_size if self.group_size == -1 else self.group_size
        if input_size % group_size or input_size % VALUES_PER_WORD or output_size % VALUES_PER_WORD:
            raise ValueError(
                f"a {input_size}x{output_size} layer does not split into groups of {group_size} inputs "
                f"and words of {VALUES_PER_WORD} values"
            )
        return input_size // group_size

    def finish(
        self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
        input_perm: torch.Tensor | None = None,
    ) -> None:
        """Keep ``codes [N, K]``, ``scales``/``mins [N, G]`` as the layer's int4 weight; drop the
        checkpoint's tensors."""
        dtype = layer.scales.dtype
        layer.int4 = Int4Weight(codes, scales, mins, codes.shape[1] // scales.shape[1], dtype)
        layer.register_buffer("input_perm", input_perm, persistent=False)
        for name in self.checkpoint_params:
            delattr(layer, name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        out = layer.int4(x)
        return out + bias if bias is not None else out
