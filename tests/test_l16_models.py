"""Lesson 16: every new architecture equals transformers on its tiny zoo model.

Mixtral and Qwen2-MoE (mixtures of experts) and Gemma 3 (a local layer with an 8-token
window, then a global one): logits of a forward pass in float32, and greedy tokens through
the whole engine, on the reference path and on lesson 15's fast path, with prompts longer
than the window.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.attention import NoCache
from nanoengine.sampling_params import SamplingParams
from tests.oracles import assert_same_greedy, hf_greedy
from tests.zoo import MODEL_ZOO

pytestmark = pytest.mark.l16

MODEL_NAMES = sorted(MODEL_ZOO)
PROMPTS = [[5, 17, 33, 2, 90], [100, 101, 7], list(range(40, 75))]


@pytest.mark.parametrize("name", MODEL_NAMES)
@given(prompt=st.lists(st.integers(0, 319), min_size=1, max_size=48))
def test_logits_equal_transformers(name, prompt, ours, hf):
    loaded, hf_model = ours(name), hf(name)
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(prompt)), NoCache()))
        expected = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast-path"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_tokens_through_the_engine_equal_transformers(name, fast_path, zoo_paths, hf):
    """A batch of three, one prompt longer than Gemma's window, prefilled in 16-token chunks
    so that a chunk starts past the window."""
    llm = LLM(str(zoo_paths[name]), dtype="float32", fast_path=fast_path, max_num_batched_tokens=16, max_num_seqs=4,
              enable_chunked_prefill=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert_same_greedy(hf(name), prompt, out.outputs[0].token_ids, hf_greedy(hf(name), prompt, 16))
