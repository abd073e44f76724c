"""Lesson 15: a decode step of a Llama-family model as one compiled call.

At batch 1 a decode step of SmolLM2 does ~1,000 small PyTorch operations (norms, rotary,
SiLU, adds, views, the KV write) and ~120 matmuls, each called from Python. Measured on an
AMD EPYC (Zen 1, 2 threads, float32), the step took 47 ms with the GEMV kernel of
``cpu_gemv`` of which the matmuls were ~20 ms: the rest was dispatch and Python. Here the
whole decoder stack runs inside one numba function per step, on the same kernels:

    for each layer:  RMSNorm -> q/k/v GEMV -> RoPE on q and k -> K/V into their slots
                     -> paged attention (lesson 15's kernel) -> o GEMV + residual
                     -> RMSNorm -> gate/up GEMV -> SiLU(gate) * up -> down GEMV + residual
    final RMSNorm

Activations stay in float32 throughout, whatever the weights' dtype (bf16 and int8 weights
are widened inside the GEMV; 4-bit codes, from ``quantization="int4"`` or a GGUF file's 4-bit
blocks, go to ``grouped_gemv``'s C kernel), so the result is at least as exact as the module
path's. The layer weights are stacked into one tensor per kind (``[layers, out, in]``, or the
nibbles ``[layers, out, in/2]``) at set-up, and every layer's tensors are re-pointed at their
slices, so nothing is held twice.

It runs only where its arithmetic is the model's: a dense Llama stack on one rank (no MoE, no
q/k norm, no biases, no LoRA, no sliding window, no early exit or image embeddings), a step
whose every sequence adds one token, at most ``max_rows`` of them, over the numba attention
backend. Anything else takes the module path, which the tests hold it to.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange, types
from numba.extending import overload
from torch import nn

from nanoengine.attention import numba_cpu
from nanoengine.attention.numba_cpu import _decode_kernel, paged_attention as numba_attention
from nanoengine.attention.torch_paged import PagedAttention
from nanoengine.model.layers import cpu_gemv
from nanoengine.model.layers.cpu_gemv import kernel_array, matmul_stored
from nanoengine.model.layers.linear import DECODE_MAX_ROWS
from nanoengine.numba_cache import cached_with
from nanoengine.profiling import profiled
from nanoengine.quant import grouped_gemv, native, w8a8 as w8a8_module
from nanoengine.quant.grouped_gemv import int4_kernel, w4a8_kernel
from nanoengine.quant.int4_kernel import Int4Weight
from nanoengine.quant.w8a8 import W8A8LinearMethod, w8a8_kernel


def _matmul(x, w, scales, int8_activations, out):  # noqa: ANN001, ANN202
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_matmul)
def _matmul_impl(x, w, scales, int8_activations, out):  # noqa: ANN001, ANN202
    """The GEMV for the weight's stored kind: 4-bit nibbles (``uint8 [N, K/2]``, with ``scales``
    ``[2, N, groups]`` holding the scales then the mins), or float32, bf16 bits or int8 codes
    (``scales [N]``). ``int8_activations``: the activations are quantized to int8 first and
    the products summed in integers (W4A8 for GGUF's 4-bit blocks, W8A8)."""
    if w.dtype == types.uint8:

        def int4(x, w, scales, int8_activations, out):  # noqa: ANN001, ANN202
            group_size = x.shape[1] // scales.shape[2]
            if int8_activations:
                w4a8_kernel(x, w, scales[0], scales[1], group_size, out)
            else:
                int4_kernel(x, w, scales[0], scales[1], group_size, out)

        return int4
    if w.dtype == types.int8:

        def int8(x, w, scales, int8_activations, out):  # noqa: ANN001, ANN202
            if int8_activations:
                w8a8_kernel(x, w, scales, out)
            else:
                matmul_stored(x, w, scales, out)

        return int8
    return lambda x, w, scales, int8_activations, out: matmul_stored(x, w, scales, out)


def _store_row(src, dst):  # noqa: ANN001, ANN202
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_store_row, inline="always")
def _store_row_impl(src, dst):  # noqa: ANN001, ANN202
    """Write a float32 row into the cache in its dtype: float32, or bf16 bit patterns rounded
    to nearest even, as ``tensor.to(torch.bfloat16)`` rounds."""
    if dst.dtype == types.int16:

        def store_bf16(src, dst):  # noqa: ANN001, ANN202
            bits = src.view(np.uint32)
            for d in range(src.shape[0]):
                b = bits[d]
                rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                dst[d] = np.int16(np.uint16(rounded))

        return store_bf16

    def store_float32(src, dst):  # noqa: ANN001, ANN202
        for d in range(src.shape[0]):
            dst[d] = src[d]

    return store_float32


@numba.njit(fastmath=True, cache=True)
def _rms_norm(x, weight, eps, out):  # noqa: ANN001, ANN202
    """``out = x / rms(x) * weight`` per row, in float32."""
    rows, size = x.shape
    for m in range(rows):
        total = np.float32(0.0)
        for d in range(size):
            total += x[m, d] * x[m, d]
        inv = np.float32(1.0) / math.sqrt(total / size + eps)
        for d in range(size):
            out[m, d] = x[m, d] * inv * weight[d]


@numba.njit(fastmath=True, cache=True)
def _rotate_half(row, num_heads, head_dim, cos, sin):  # noqa: ANN001, ANN202
    """RoPE in place on the first ``num_heads`` heads of ``row`` (``head_dim`` values each) at
    one position, in Llama's rotate-half layout."""
    half = head_dim // 2
    for h in range(num_heads):
        base = h * head_dim
        for d in range(half):
            a, b = row[base + d], row[base + d + half]
            row[base + d] = a * cos[d] - b * sin[d]
            row[base + d + half] = b * cos[d + half] + a * sin[d + half]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _silu_mul(gate_up, out):  # noqa: ANN001, ANN202
    """``out = silu(gate) * up`` per row, ``gate_up`` holding gate then up (``[M, 2I]``)."""
    rows, inter = out.shape
    for m in range(rows):
        for i in prange(inter):
            g = gate_up[m, i]
            out[m, i] = g / (np.float32(1.0) + math.exp(-g)) * gate_up[m, inter + i]


# Cached on disk keyed by the files of the kernels it compiles in (numba's own key is this file
# alone; the attention kernel is lesson 15's task L15.T1), and by whether the C kernels built.
@numba.njit(fastmath=True, cache=True)
@cached_with(numba_cpu, cpu_gemv, grouped_gemv, w8a8_module, native, salt=lambda: str(native.library() is not None))
def _decode_stack(
    x, positions, slots, block_tables, seq_lens, cos, sin, k_pool, v_pool,
    w_in, w_post, w_qkv, s_qkv, w_o, s_o, w_gate_up, s_gate_up, w_down, s_down, w_final,
    int8_activations, num_heads, num_kv_heads, head_dim, eps, scale,
):  # noqa: ANN001, ANN202
    """Every decoder layer and the final norm on ``x [M, H]`` (float32, updated in place).
    ``int8_activations[kind]``: whether that kind of projection (q/k/v, o, gate/up, down)
    quantizes its activations (W4A8, W8A8)."""
    rows, hidden = x.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    inter = w_gate_up.shape[1] // 2  # (shape[1]: output rows, whatever the weight's storage)
    block_size = k_pool.shape[2]
    normed = np.empty_like(x)
    qkv = np.empty((rows, q_size + 2 * kv_size), np.float32)
    q = np.empty((rows, num_heads, head_dim), np.float32)
    attn = np.empty((rows, num_heads, head_dim), np.float32)
    proj = np.empty_like(x)
    gate_up = np.empty((rows, 2 * inter), np.float32)
    act = np.empty((rows, inter), np.float32)
    for layer in range(w_qkv.shape[0]):
        _rms_norm(x, w_in[layer], eps, normed)
        _matmul(normed, w_qkv[layer], s_qkv[layer], int8_activations[0], qkv)
        for m in range(rows):
            pos = positions[m]
            row = qkv[m]
            _rotate_half(row, num_heads + num_kv_heads, head_dim, cos[pos], sin[pos])
            for h in range(num_heads):
                for d in range(head_dim):
                    q[m, h, d] = row[h * head_dim + d]
            block, offset = slots[m] // block_size, slots[m] % block_size
            for h in range(num_kv_heads):
                k_start, v_start = q_size + h * head_dim, q_size + kv_size + h * head_dim
                _store_row(row[k_start : k_start + head_dim], k_pool[layer, block, offset, h])
                _store_row(row[v_start : v_start + head_dim], v_pool[layer, block, offset, h])
        _decode_kernel(q, k_pool[layer], v_pool[layer], block_tables, seq_lens, scale, attn)
        _matmul(attn.reshape((rows, q_size)), w_o[layer], s_o[layer], int8_activations[1], proj)
        x += proj
        _rms_norm(x, w_post[layer], eps, normed)
        _matmul(normed, w_gate_up[layer], s_gate_up[layer], int8_activations[2], gate_up)
        _silu_mul(gate_up, act)
        _matmul(act, w_down[layer], s_down[layer], int8_activations[3], proj)
        x += proj
    _rms_norm(x, w_final, eps, normed)
    x[:] = normed


def _int4_weight(linear: nn.Module) -> Int4Weight | None:
    """The layer's weight when it is one 4-bit matrix held as nibbles (lesson 11's
    ``Int4Weight`` off PyTorch's kernel: ``quantization="int4"``, or a GGUF file's 4-bit
    blocks), the kind the fused step multiplies in place. GPTQ and AWQ layers hold one too, but
    may permute their inputs first (act-order), so they take the module path."""
    from nanoengine.quant.gguf import GGUFLinearMethod
    from nanoengine.quant.int4 import Int4LinearMethod

    method = linear.linear_method
    if isinstance(method, GGUFLinearMethod):
        weight = linear.gguf_weights[0] if len(linear.gguf_weights) == 1 else None
    elif type(method) is Int4LinearMethod:
        weight = linear.int4
    else:
        return None
    if not isinstance(weight, Int4Weight) or weight.use_kernel:
        return None
    return weight


def _stack_weights(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[layers, ...]`` tensor of the layers' stored weights and one of their scales:
    float weights ``[layers, out, in]`` with ones ``[layers, out]``; int8 codes with their
    float32 scales ``[layers, out]``; 4-bit nibbles ``[layers, out, in/2]`` with scales and
    mins ``[layers, 2, out, groups]``. Each layer's own tensors become views of their slices
    (where the dtype allows), so the model keeps one copy."""
    int4 = [_int4_weight(linear) for linear in linears]
    if int4[0] is not None:
        nibbles = torch.stack([w.nibbles for w in int4])
        scales = torch.stack([torch.stack([w.scales.float(), w.mins.float()]) for w in int4])
        for i, weight in enumerate(int4):
            weight._buffers["nibbles"] = nibbles[i]
            if weight.scales.dtype == torch.float32:
                weight._buffers["scales"], weight._buffers["mins"] = scales[i, 0], scales[i, 1]
        return nibbles, scales
    name = "qweight" if getattr(linears[0], "qweight", None) is not None else "weight"
    stacked = torch.stack([getattr(linear, name).detach() for linear in linears])
    for i, linear in enumerate(linears):
        if name == "weight":
            linear.weight.data = stacked[i]
        else:
            linear._buffers["qweight"] = stacked[i]
    if name == "qweight":
        scales = torch.stack([linear.scales.float() for linear in linears])
    else:
        scales = torch.ones(stacked.shape[:2], dtype=torch.float32)
    return stacked, scales


class FusedDecode:
    """The decoder stack of one :class:`~nanoengine.model.llama.LlamaModel` for decode steps.

    Invariant: the stacked weights are the layers' own (each layer's weight is a view of its
    slice), and the norms' weights are float32 copies taken at set-up, after loading: nothing
    writes a loaded model's weights again (a LoRA adapter wraps a layer instead, and the
    fused path then stands aside: :meth:`runs`).
    """

    def __init__(self, model: nn.Module, max_rows: int = DECODE_MAX_ROWS) -> None:
        self.model = model
        self.max_rows = max_rows
        self.layers = layers = list(model.local_layers)
        attn0 = layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        self.scale = attn0.scale
        self.eps = layers[0].input_layernorm.eps
        self.modules = self._modules_now()
        # weight and scales of q/k/v, o, gate/up and down, each [layers, out, in] and [layers, out]
        stacked = [_stack_weights(self.modules[kind::4]) for kind in range(4)]
        # 4-bit nibbles are read as the bytes they are; other weights as the GEMV reads them
        self.weights = [t.numpy() if t.dtype == torch.uint8 else kernel_array(t) for pair in stacked for t in pair]
        # per kind: whether its activations are quantized to int8 (W4A8, W8A8)
        self.int8_activations = np.array([_storage(self.modules[kind]) in ("w4a8", "w8a8") for kind in range(4)])
        self.norms = [
            torch.stack([layer.input_layernorm.weight.float() for layer in layers]).numpy(),
            torch.stack([layer.post_attention_layernorm.weight.float() for layer in layers]).numpy(),
            model.norm.weight.float().numpy(),
        ]

    def _modules_now(self) -> list[nn.Module]:
        """The projections of every layer, in the order q/k/v, o, gate/up, down: a wrapper put
        in their place later (LoRA, lesson 14) changes the arithmetic, and the fused path then
        stands aside. Read from the modules' own dicts: this runs every step, and
        ``nn.Module.__getattr__`` would cost ~0.4 ms a step on SmolLM2's 120 projections."""
        projections = []
        for layer in self.layers:
            attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
            projections += (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])
        return projections

    def runs(self, attn: object, num_tokens: int) -> bool:
        """Whether this step is one the fused stack computes exactly as the modules would."""
        if not isinstance(attn, PagedAttention) or attn.attention_fn is not numba_attention:
            return False
        if num_tokens > self.max_rows or attn.metadata.num_seqs != num_tokens:
            return False  # some sequence adds more than one token: a prefill chunk
        if attn.kv_cache.k.dtype not in (torch.float32, torch.bfloat16):
            return False
        return all(a is b for a, b in zip(self._modules_now(), self.modules))

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, attn: PagedAttention) -> torch.Tensor:
        """The final-normed hidden states of the step's tokens, as the module path returns them."""
        x = hidden.float().contiguous()
        metadata, cache = attn.metadata, attn.kv_cache
        w_in, w_post, w_final = self.norms
        with profiled("nanoengine.fused_decode"):
            _decode_stack(
                x.numpy(), positions.numpy(), metadata.slot_mapping.numpy(), metadata.block_tables.numpy(),
                np.asarray(metadata.seq_lens, np.int64), self.model.rotary.cos.numpy(), self.model.rotary.sin.numpy(),
                kernel_array(cache.k), kernel_array(cache.v), w_in, w_post, *self.weights, w_final, self.int8_activations,
                self.num_heads, self.num_kv_heads, self.head_dim, np.float32(self.eps), np.float32(self.scale),
            )
        return x.to(hidden.dtype)


def fusable(model: nn.Module) -> bool:
    """A dense Llama-family stack on one rank, exactly the arithmetic :func:`_decode_stack` does."""
    from nanoengine.model.layers.rotary import RotaryEmbedding
    from nanoengine.model.llama import LlamaDecoderLayer, LlamaMLP, LlamaModel

    inner = getattr(model, "model", None)
    if type(inner) is not LlamaModel or inner.pp.size != 1 or inner.norm is None:
        return False
    if type(inner.rotary) is not RotaryEmbedding:
        return False
    for layer in inner.local_layers:
        attn = layer.self_attn
        if type(layer) is not LlamaDecoderLayer or type(layer.mlp) is not LlamaMLP or attn.qk_norm:
            return False
        projections = (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if attn.qkv_proj.tp.size != 1 or any(p.bias is not None for p in projections):
            return False
        if not all(_storage(p) is not None for p in projections):
            return False
    # each kind of projection is stored alike in every layer (they are stacked into one tensor)
    layers = inner.local_layers
    kinds = [[(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)[kind]
              for layer in layers] for kind in range(4)]
    return all(len({_storage(p) for p in kind}) == 1 for kind in kinds)


def _storage(linear: nn.Module) -> str | None:
    """How the fused step multiplies by this layer's weight, or None when it cannot."""
    from nanoengine.model.layers.cpu_gemv import GemvLinearMethod

    if isinstance(linear.linear_method, GemvLinearMethod):
        return "gemv"
    if isinstance(linear.linear_method, W8A8LinearMethod):
        return "w8a8"
    int4 = _int4_weight(linear)
    if int4 is None:
        return None
    return "w4a8" if int4.int8_activations else "int4"


def use_fused_decode(model: nn.Module) -> bool:
    """Give ``model`` a :class:`FusedDecode` where :func:`fusable`; returns whether it did."""
    if not fusable(model):
        return False
    model.model.fused_decode = FusedDecode(model.model)
    return True
