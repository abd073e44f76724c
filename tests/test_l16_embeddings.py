"""Lesson 16, embedding models: one vector per text.

Oracles: sentence-transformers on the bundled all-MiniLM-L6-v2 (a BERT encoder, mean
pooling, normalised), transformers' last hidden states for a decoder embedding with its
last token, and a per-sequence loop for the pooler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanoengine import LLM
from nanoengine.model import resolve_model_path
from nanoengine.pooling import PoolerConfig
from nanoengine.pooling.pooler import pool

pytestmark = pytest.mark.l16

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paging splits the KV cache into fixed-size blocks.",
    "Hi",
    "Ünïcödé: naïve café, 東京 and 北京, emoji 🚀🌍",
    "def attention(q, k, v): return softmax(q @ k.T) @ v " * 11,  # about 245 tokens: near the 256 limit
]


@pytest.mark.l16_t4
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), kind=st.sampled_from(["MEAN", "CLS", "LAST"]),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_pooling_takes_each_sequences_mean_first_or_last_row(lengths, kind, normalize, seed):
    hidden = torch.randn(sum(lengths), 8, generator=torch.Generator().manual_seed(seed))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    rows = [hidden[a:b] for a, b in zip(starts, starts[1:])]
    want = torch.stack([r.mean(0) if kind == "MEAN" else r[0] if kind == "CLS" else r[-1] for r in rows])
    if normalize:
        want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pool(hidden, starts, kind, normalize), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    return LLM("all-minilm-l6-v2", dtype="float32")


@pytest.mark.slow
def test_minilm_embeds_as_sentence_transformers_does(minilm):
    from sentence_transformers import SentenceTransformer

    assert minilm.task == "embed" and minilm.embedder.pooler_config == PoolerConfig("MEAN", True)
    ours = torch.tensor([o.outputs.embedding for o in minilm.embed(TEXTS, use_tqdm=False)])
    theirs = torch.from_numpy(SentenceTransformer(str(resolve_model_path("all-minilm-l6-v2")), device="cpu").encode(TEXTS))
    assert ours.shape == (len(TEXTS), 384)
    assert F.cosine_similarity(ours, theirs).min() > 1 - 1e-4
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_text_embeds_the_same_alone_and_in_a_batch(minilm):
    alone = [minilm.embed(t, use_tqdm=False)[0].outputs.embedding for t in TEXTS]
    batched = [o.outputs.embedding for o in minilm.embed(TEXTS, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=0, atol=1e-5)


def test_a_text_past_the_models_limit_is_refused_by_name(minilm):
    with pytest.raises(ValueError, match="is 300 tokens; max_model_len is 256"):
        minilm.embed({"prompt_token_ids": [1000] * 300})


def test_an_embedding_model_does_not_generate_and_a_generator_does_not_embed(minilm, zoo_paths):
    with pytest.raises(ValueError, match=r"it does not generate: call llm\.embed"):
        minilm.generate("Hello")
    with pytest.raises(ValueError, match="is an encoder"):
        LLM("all-minilm-l6-v2", task="generate")
    with pytest.raises(ValueError, match="task='embed'"):
        LLM(str(zoo_paths["llama-gqa"]), dtype="float32").embed("Hello")
    with pytest.raises(ValueError, match="pooler_config has unknown keys"):
        LLM(str(zoo_paths["llama-gqa"]), task="embed", pooler_config={"pooling": "MEAN"})
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        PoolerConfig("MAX")


@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
def test_a_decoder_embeds_with_its_last_hidden_states(kind, zoo_paths):
    """A Llama as an embedding model: the final norm's output of the last token (or the
    mean), normalised, as transformers' base model computes it."""
    from transformers import AutoModel

    path = zoo_paths["llama-gqa"]
    llm = LLM(str(path), dtype="float32", task="embed", pooler_config={"pooling_type": kind})
    prompts = [[5, 17, 33, 2, 90], [100, 101, 7], list(range(40, 75))]
    ours = [o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)]
    base = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt, vector in zip(prompts, ours):
        with torch.inference_mode():
            hidden = base(torch.tensor([prompt])).last_hidden_state[0]
        want = F.normalize(hidden[-1] if kind == "LAST" else hidden.mean(0), dim=-1)
        torch.testing.assert_close(torch.tensor(vector), want, rtol=1e-4, atol=1e-5)


def test_an_encoder_on_several_ranks_is_refused_and_leaves_no_world_behind():
    import torch.distributed as dist

    with pytest.raises(ValueError, match="an encoder model runs on one rank"):
        LLM("all-minilm-l6-v2", dtype="float32", tensor_parallel_size=2)
    assert not dist.is_initialized()
