# Run from a checkout: python docs/bench/n13d_compile_probe.py 1 8 32   (batch sizes; SmolLM2 float32, module path)
# WRITE_IN_OP=1: the K/V write inside the opaque op (as vLLM's attention op does); else traced.
"""Probe: does torch.compile (inductor) make a batch decode step of SmolLM2 (float32, module
path) faster on this CPU, with paged attention as an opaque custom op?"""
import os
import sys
import time
import torch
from nanoengine.config import ModelConfig
from nanoengine.model import load_model

import nanoengine.attention.numba_cpu  # noqa: F401 (registers torch.ops.nanoengine.decode_attention)
from nanoengine.attention.torch_paged import write_kv

torch.set_num_threads(2)


@torch.library.custom_op("probe::write_and_attend", mutates_args=("k_cache", "v_cache"))
def write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    write_kv(k_cache, v_cache, k, v, slots)
    return torch.ops.nanoengine.decode_attention(q.contiguous(), k_cache, v_cache, tables, lens, scale)


@write_and_attend.register_fake
def _(q, k, v, k_cache, v_cache, slots, tables, lens, scale):
    return torch.empty_like(q)


class Ctx:
    def __init__(self, kc, vc, slots, tables, lens):
        self.kc, self.vc, self.slots, self.tables, self.lens = kc, vc, slots, tables, lens
    def attend(self, layer_idx, q, k, v, scale, sliding_window=None):
        k_cache, v_cache = self.kc[layer_idx], self.vc[layer_idx]
        if os.environ.get("WRITE_IN_OP"):
            return write_and_attend(q, k, v, k_cache, v_cache, self.slots, self.tables, self.lens, scale)
        write_kv(k_cache, v_cache, k, v, self.slots)
        return torch.ops.nanoengine.decode_attention(q.contiguous(), k_cache, v_cache, self.tables, self.lens, scale)

cfg = ModelConfig(model="smollm2-135m-instruct", dtype="float32", fast_path=False)
loaded = load_model(cfg)
model = loaded.model
layers, bs, hkv, d = 30, 16, 3, 64
ctx_len = 160
for B in [int(b) for b in sys.argv[1:]]:
    nblk = B * (ctx_len // bs + 2)
    kc = torch.randn(layers, nblk, bs, hkv, d); vc = torch.randn_like(kc)
    per = ctx_len // bs + 2
    tables = torch.arange(nblk, dtype=torch.int32).view(B, per)
    lens = torch.full((B,), ctx_len + 1, dtype=torch.int64)
    slots = tables[:, ctx_len // bs].long() * bs + ctx_len % bs
    ids = torch.randint(0, 1000, (B,)); pos = torch.full((B,), ctx_len)
    ctx = Ctx(kc, vc, slots, tables, lens)
    def step(ids, pos):
        return model.model(ids, pos, ctx)
    with torch.inference_mode():
        for _ in range(2): step(ids, pos)
        t = time.perf_counter(); n = 8
        for _ in range(n): step(ids, pos)
        eager = (time.perf_counter() - t) / n * 1000
    compiled = torch.compile(step, dynamic=False, options={"freezing": True} if os.environ.get("FREEZE") else None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = step(ids, pos)
        out = compiled(ids, pos)
        ctime = time.perf_counter() - t0
        for _ in range(2): compiled(ids, pos)
        t = time.perf_counter()
        for _ in range(n): compiled(ids, pos)
        comp = (time.perf_counter() - t) / n * 1000
    print(f"B={B}: eager {eager:.1f} ms, compiled {comp:.1f} ms (compile {ctime:.0f} s), max diff {(out-ref).abs().max():.2e}", flush=True)
