"""A GGUF file's quantized blocks run as they are (``quantization="gguf"``), never expanded to float.

llama.cpp's block types all come down to integer codes with a scale (and for some a min) per
small group of consecutive inputs of one output row, ``w = code * scale + min``, so each
decodes once, at load time, into one of two runtime weights:

- 4-bit codes (Q4_0, Q4_1, Q4_K; groups of 32) -> :class:`~nanoengine.quant.int4_kernel.Int4Weight`,
  the int4 matmul that lesson 11's other 4-bit methods run on; Q4_0's ``(q - 8) * d`` is the
  min ``-8d``, Q4_K's two-level scales multiply out to one scale and min per 32 inputs.
- 8-bit-ish codes (Q8_0: int8, groups of 32; Q6_K: ``q - 32``, groups of 16) ->
  :class:`GroupedInt8Weight`, a byte per code, which PyTorch's int8 kernel runs group by group
  for a decode step and which larger batches dequantize a tile of rows at a time.

On the fast path (lesson 15, :func:`use_int8_activations`), a decode step's few rows multiply
either kind by activations quantized to int8 per group (W4A8, and W8A8 per group), as
llama.cpp (Q8 activations) and vLLM's GGUF kernels do; prefill dequantizes the weights and
keeps float activations, and so does the reference path at every row count.

F32/F16/BF16 tensors stay dense in the model's dtype. The vocabulary matrix, whose rows the
embedding gathers, is a :class:`GroupedInt8Weight` whatever its type (see
``nanoengine/model/layers/embedding.py``). Decoding reads the bytes with numpy;
``gguf.quants.dequantize`` is the oracle the tests hold it to, value for value.

A fused layer (q/k/v, gate/up) gets its shards in whatever types the file chose (Q4_K_M
files mix Q4_K and Q6_K within one layer): neighbouring shards of one kind are stacked into
one weight, and the outputs of the weights that a mix leaves apart are concatenated.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from nanoengine.model.gguf_file import GGUFBlocks
from nanoengine.model.layers.linear import DECODE_MAX_ROWS, LinearMethodBase
from nanoengine.quant.base import QuantizationConfig
from nanoengine.quant.int4_kernel import Int4Weight

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """``[rows, n_blocks * block_bytes]`` -> ``[rows, n_blocks, block_bytes]``."""
    raw = np.asarray(raw, dtype=np.uint8)
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 field at byte ``offset`` of every block, as float32 ``[rows, n_blocks]``."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes ``[..., n]`` -> 4-bit codes ``[..., 2n]``: all the low nibbles, then all the high ones
    (how ggml packs a run of 2n codes)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def q4_0_to_int4(raw: np.ndarray) -> Codes:
    """Q4_0 rows -> (codes uint8 ``[N, K]``, scales, mins ``[N, K / 32]``).

    A block (18 bytes) is a float16 ``d`` and 32 codes in 16 bytes; ``w = (q - 8) * d``.
    """
    blocks = _blocks(raw, 18)
    d = _f16(blocks, 0)
    codes = _nibbles(blocks[..., 2:]).reshape(blocks.shape[0], -1)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(-8 * d)


def q4_1_to_int4(raw: np.ndarray) -> Codes:
    """Q4_1 rows ``[N, n_blocks * 20]`` -> (codes uint8 ``[N, K]`` in 0..15, scales, mins
    float32 ``[N, n_blocks]``), ``K = 32 * n_blocks``: one int4 group per block.

    A block (20 bytes) is a float16 scale ``d``, a float16 min ``m``, then 16 bytes of codes:
    byte ``j``'s low nibble is the block's code ``j``, its high nibble code ``j + 16``;
    ``w = q * d + m``.
    """
    # BEGIN SOLUTION L11.T4
    rows = raw.shape[0]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, 20)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)
    # END SOLUTION


def _six_bit_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K-quants' 12 bytes ``[..., 12]`` -> 8 scales and 8 mins ``[..., 8]``, 6 bits each.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7
    take their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare
    top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], axis=-1)
    mins = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales, mins


def q4_k_to_int4(raw: np.ndarray) -> Codes:
    """Q4_K rows -> (codes uint8 ``[N, K]``, scales, mins ``[N, K / 32]``).

    A super-block (144 bytes, 256 weights) is a float16 ``d`` and ``dmin``, 12 bytes of 6-bit
    sub-scales ``sc`` and sub-mins ``m`` (8 of each), then 4 runs of 32 bytes, each holding two
    sub-blocks of 32 codes (low nibbles, then high); ``w = d * sc * q - dmin * m``.
    """
    blocks = _blocks(raw, 144)
    rows, n_blocks = blocks.shape[:2]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sub_scales, sub_mins = _six_bit_scales(blocks[..., 4:16])
    codes = _nibbles(blocks[..., 16:].reshape(rows, n_blocks, 4, 32)).reshape(rows, -1)
    scales = (d[..., None] * sub_scales.astype(np.float32)).reshape(rows, -1)
    mins = -(dmin[..., None] * sub_mins.astype(np.float32)).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(mins)


def q8_0_to_int8(raw: np.ndarray) -> Codes:
    """Q8_0 rows -> (codes int8 ``[N, K]``, scales ``[N, K / 32]``, no mins).

    A block (34 bytes) is a float16 ``d`` and 32 int8 codes; ``w = q * d``.
    """
    blocks = _blocks(raw, 34)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], -1)
    return torch.from_numpy(codes), torch.from_numpy(_f16(blocks, 0)), None


def q6_k_to_int8(raw: np.ndarray) -> Codes:
    """Q6_K rows -> (codes int8 ``[N, K]`` in -32..31, scales ``[N, K / 16]``, no mins).

    A super-block (210 bytes, 256 weights) is 128 bytes of low nibbles, 64 bytes of high
    2-bit pairs, 16 int8 sub-scales ``sc`` and a float16 ``d``; ``w = d * sc * (q - 32)``
    per 16 weights. Each half of 128 weights takes 64 low-nibble bytes (low nibbles are its
    weights 0-63, high nibbles 64-127) and 32 high bytes (bits ``2i..2i+1`` of byte ``l``
    complete weight ``32i + l``).
    """
    blocks = _blocks(raw, 210)
    rows, n_blocks = blocks.shape[:2]
    low = _nibbles(blocks[..., :128].reshape(rows, n_blocks, 2, 64))
    high_bytes = blocks[..., 128:192].reshape(rows, n_blocks, 2, 1, 32)
    high = (high_bytes >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03
    codes = (low | (high.reshape(rows, n_blocks, 2, 128) << 4)).astype(np.int8) - np.int8(32)
    sub_scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    scales = (_f16(blocks, 208)[..., None] * sub_scales).reshape(rows, -1)
    return torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(scales), None


# GGUF type -> (decoder, bits of its codes: 4 runs on the int4 kernel, 8 on GroupedInt8Weight)
_DECODERS: dict[Q, tuple[Callable[[np.ndarray], Codes], int]] = {
    Q.Q4_0: (q4_0_to_int4, 4),
    Q.Q4_1: (q4_1_to_int4, 4),
    Q.Q4_K: (q4_k_to_int4, 4),
    Q.Q8_0: (q8_0_to_int8, 8),
    Q.Q6_K: (q6_k_to_int8, 8),
}


@dataclasses.dataclass
class GroupedCodes:
    """A decoded ``[N, K]`` matrix: ``w = codes * scale + min`` per group of ``group_size`` inputs.

    Invariant: ``scales`` (and ``mins``, None for the symmetric 8-bit types) are float32
    ``[N, K / group_size]``; ``bits == 4`` means codes in 0..15 with mins.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group_size: int
    bits: int


def check_runnable(blocks: GGUFBlocks) -> None:
    """Refuse, naming the tensor, a GGUF type that no runtime weight here decodes."""
    if blocks.qtype not in _DECODERS:
        runs = ", ".join(t.name for t in _DECODERS)
        raise ValueError(
            f"GGUF tensor {blocks.name!r} is {blocks.qtype.name}, which quantization='gguf' cannot run "
            f"(it runs {runs}, and float tensors); load the file without quantization= to dequantize it"
        )


def decode(blocks: GGUFBlocks) -> GroupedCodes:
    """A quantized tensor's blocks as codes and per-group scales (and mins)."""
    check_runnable(blocks)
    decoder, bits = _DECODERS[blocks.qtype]
    codes, scales, mins = decoder(blocks.data)
    return GroupedCodes(codes, scales, mins, codes.shape[1] // scales.shape[1], bits)


# How many weights one tile of GroupedInt8Weight dequantizes at a time: 1 MB in bf16.
_TILE_ELEMENTS = 1 << 19
# Up to this many rows of half-precision activations, PyTorch's int8 kernel run once per group
# beats dequantizing tiles (the [49152 x 576] Q8_0 head of SmolLM2, bf16, 2 cores: 2.3 ms
# against 8 ms for one row, 5.4 against 8.3 for four, 10.5 against 8.7 for eight).
_PER_GROUP_KERNEL_MAX_ROWS = 4


class GroupedInt8Weight(nn.Module):
    """A ``[N, K]`` weight held as a byte per code, a scale (and optionally a min) per group of
    ``group_size`` inputs; ``forward(x) = x @ Wᵀ``, ``rows(ids) = W[ids]``.

    The float weight never exists whole. A few rows of float32 activations on a CPU run lesson
    15's kernel (``int8_activations``: GGUF's blocks quantize the activations to int8 per group
    first, as llama.cpp does, and sum the products in integers). A few rows of bf16/f16 activations run
    ``_weight_int8pack_mm`` (int8 weights, one scale per output) once per group of inputs and
    add up the groups' outputs; larger batches dequantize a tile of about 1 MB of rows at a
    time into the activations' dtype for ``F.linear``. Invariant: stored group-major, so that
    each group's codes are one contiguous ``[N, group_size]`` matrix: ``codes`` int8
    ``[K / group_size, N, group_size]``, ``scales``/``mins`` ``[K / group_size, N]`` in ``dtype``.
    """

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
        dtype: torch.dtype, int8_activations: bool = False,
    ) -> None:
        super().__init__()
        n, k = codes.shape
        self.group_size, self.tile_rows = group_size, max(1, _TILE_ELEMENTS // k)
        self.int8_activations = int8_activations
        grouped = codes.to(torch.int8).view(n, k // group_size, group_size).transpose(0, 1).contiguous()
        self.register_buffer("codes", grouped, persistent=False)
        self.register_buffer("scales", scales.t().to(dtype).contiguous(), persistent=False)
        self.register_buffer("mins", None if mins is None else mins.t().to(dtype).contiguous(), persistent=False)

    def _dequantize(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (a slice, or ids of any shape) as ``[..., K]`` in the scales' dtype."""
        values = self.codes[:, index].to(self.scales.dtype) * self.scales[:, index, None]
        if self.mins is not None:
            values += self.mins[:, index, None]
        return values.movedim(0, -2).flatten(-2)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` (any shape) dequantized: an embedding lookup."""
        return self._dequantize(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if x.dtype == torch.float32 and x.is_cpu and flat.shape[0] <= DECODE_MAX_ROWS:
            # lesson 15: a numba kernel multiplies the codes in place
            from nanoengine.quant.grouped_gemv import grouped_int8_matmul

            mins = None if self.mins is None else self.mins.float()
            return grouped_int8_matmul(x, self.codes, self.scales.float(), mins, self.int8_activations)
        if flat.shape[0] <= _PER_GROUP_KERNEL_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.is_cpu:
            out = self._per_group_kernel(flat)
        else:
            out = flat.new_empty(flat.shape[0], self.codes.shape[1])
            for start in range(0, out.shape[1], self.tile_rows):
                tile = slice(start, start + self.tile_rows)
                out[:, tile] = F.linear(flat, self._dequantize(tile).to(x.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    def _per_group_kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``Σ_g scale_g * (x_g @ codes_gᵀ) (+ min_g * Σ x_g)``, summed in float32."""
        groups = flat.view(flat.shape[0], -1, self.group_size).transpose(0, 1).contiguous()
        out = torch.zeros(flat.shape[0], self.codes.shape[1], dtype=torch.float32)
        for g, x_g in enumerate(groups):
            out += torch.ops.aten._weight_int8pack_mm(x_g, self.codes[g], self.scales[g].to(flat.dtype))
            if self.mins is not None:
                out += x_g.float().sum(-1, keepdim=True) * self.mins[g].float()
        return out.to(flat.dtype)


def use_int8_activations(model: nn.Module) -> int:
    """Lesson 15's fast path for GGUF's codes: every 4-bit and grouped 8-bit weight of ``model``
    multiplies a decode step's rows by activations quantized to int8 per group, summing the
    products in integers (as llama.cpp does); returns how many weights. The reference path
    keeps float activations, and the fast path is held to it by a near-tie rule."""
    weights = [m for m in model.modules() if isinstance(m, Int4Weight | GroupedInt8Weight)]
    for weight in weights:
        weight.int8_activations = True
    return len(weights)


class DenseWeight(nn.Module):
    """A float GGUF tensor kept as it is, in the model's dtype: ``forward(x) = x @ Wᵀ``."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _runtime_weight(part: GroupedCodes | torch.Tensor, dtype: torch.dtype) -> nn.Module:
    if isinstance(part, torch.Tensor):
        return DenseWeight(part, dtype)
    if part.bits == 4:
        return Int4Weight(part.codes, part.scales, part.mins, part.group_size, dtype)
    return GroupedInt8Weight(part.codes, part.scales, part.mins, part.group_size, dtype)


def _decoded(loaded: GGUFBlocks | torch.Tensor) -> GroupedCodes | torch.Tensor:
    return decode(loaded) if isinstance(loaded, GGUFBlocks) else loaded


def gguf_linear_weight(loaded: GGUFBlocks | torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """The module that multiplies by one GGUF matrix (``forward(x) = x @ Wᵀ``), in its own kind."""
    return _runtime_weight(_decoded(loaded), dtype)


def gguf_rows_weight(blocks: GGUFBlocks, dtype: torch.dtype) -> GroupedInt8Weight:
    """A quantized GGUF matrix whose rows can also be gathered (an embedding, maybe tied to the
    LM head): a byte per code whatever the type, as the int4 kernel's packing is not row-addressable."""
    part = decode(blocks)
    return GroupedInt8Weight(part.codes, part.scales, part.mins, part.group_size, dtype)


def _merge_key(part: GroupedCodes | torch.Tensor) -> tuple:
    return ("dense",) if isinstance(part, torch.Tensor) else (part.bits, part.group_size)


def _stack(parts: list[GroupedCodes | torch.Tensor]) -> list[GroupedCodes | torch.Tensor]:
    """Consecutive shards of one kind stacked along the output rows into one: as few matmuls
    as the mix of types allows, their outputs still in shard order."""
    stacked = []
    for _, run in itertools.groupby(parts, key=_merge_key):
        run = list(run)
        first = run[0]
        if len(run) == 1:
            stacked.append(first)
        elif isinstance(first, torch.Tensor):
            stacked.append(torch.cat(run))
        else:
            mins = None if first.mins is None else torch.cat([p.mins for p in run])
            codes, scales = torch.cat([p.codes for p in run]), torch.cat([p.scales for p in run])
            stacked.append(GroupedCodes(codes, scales, mins, first.group_size, first.bits))
    return stacked


class GGUFConfig(QuantizationConfig):
    name = "gguf"

    def linear_method(self, prefix: str) -> GGUFLinearMethod:
        return GGUFLinearMethod()


class GGUFLinearMethod(LinearMethodBase):
    """Collects a layer's GGUF tensors (one per shard) as they load, decodes them after loading.

    Until then the layer's ``weight`` is an empty placeholder (the loader fills parameters by
    name) and ``gguf_shards`` holds each shard's :class:`GGUFBlocks` (a view of the file, no
    copy) or float tensor; afterwards ``gguf_weights`` holds the runtime weights, one per run
    of output rows, in order, and nothing else remains.
    """

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        layer.gguf_shards = {}

    def load_weight(
        self, layer: nn.Module, param: nn.Parameter, loaded: GGUFBlocks | torch.Tensor, shard_id: str | None
    ) -> None:
        rows = layer.shard_offsets[shard_id][1] if shard_id is not None else layer.output_size
        if tuple(loaded.shape) != (rows, layer.input_size):
            raise ValueError(
                f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {(rows, layer.input_size)}"
            )
        if isinstance(loaded, GGUFBlocks):
            check_runnable(loaded)
        layer.gguf_shards[shard_id] = loaded

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        shard_ids = list(getattr(layer, "shard_offsets", [None]))
        decoded = [_decoded(layer.gguf_shards[s]) for s in shard_ids]
        dtype = layer.weight.dtype
        layer.gguf_weights = nn.ModuleList(_runtime_weight(p, dtype) for p in _stack(decoded))
        del layer.weight, layer.gguf_shards

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weights = layer.gguf_weights
        out = weights[0](x) if len(weights) == 1 else torch.cat([w(x) for w in weights], dim=-1)
        return out + bias if bias is not None else out
