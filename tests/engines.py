"""Building and driving engines in tests: the batching engine on a zoo model with a given
KV budget, and the one-at-a-time engine as the "alone" oracle."""

from __future__ import annotations

import asyncio
import concurrent.futures

from nanoengine.config import CacheConfig, SchedulerConfig
from nanoengine.engine.inputs import Prompt
from nanoengine.engine.llm_engine import LLMEngine
from nanoengine.engine.naive import NaiveEngine

BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, float32


def make_engine(loaded, num_tokens=4096, block_size=4, max_num_seqs=8, budget=None, chunked=True, prefix_caching=False):
    """Prefix caching is off unless asked for: lessons 06–07 test batching alone, so their
    tests never run lesson 08's code."""
    return LLMEngine(
        loaded,
        CacheConfig(block_size=block_size, kv_cache_memory_bytes=num_tokens * BYTES_PER_TOKEN,
                    enable_prefix_caching=prefix_caching),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked),
    )


def drive(engine, arrivals):
    """``arrivals``: (step, request_id, prompt ids, params); returns final token ids per request."""
    return {request_id: out.outputs[0].token_ids for request_id, out in drive_outputs(engine, arrivals).items()}


def drive_outputs(engine, arrivals):
    """Run ``arrivals`` (as :func:`drive`) to the end; returns each request's final RequestOutput."""
    finished, step, pending = {}, 0, sorted(arrivals, key=lambda a: a[0])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params = pending.pop(0)
            engine.add_request(request_id, Prompt(None, prompt), params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < 5000, "the engine stopped making progress"
    return finished


def alone(loaded, prompt, params):
    naive = NaiveEngine(loaded, kv_cache="contiguous")
    naive.add_request("alone", Prompt(None, prompt), params)
    outputs = []
    while naive.has_unfinished_requests():
        outputs += naive.step()
    return outputs[-1].outputs[0].token_ids


def run_async(coroutine):
    """``asyncio.run`` in a thread of its own, so it also works under a running event loop
    (``check("l13")`` in a notebook runs the tests inside Jupyter's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
