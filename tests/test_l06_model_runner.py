"""Lesson 06: the model runner alone, on steps made by hand (no scheduler), against transformers.

Each step is a ``SchedulerOutput`` written here: every live sequence computes its next chunk
of tokens at hand-picked blocks scattered over the pool, a prefill chunk beside other
sequences' single decode tokens. Wherever a chunk reaches the end of its sequence, the
logits the runner samples from must be transformers' logits at that position.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.attention.registry import get_attention_backend
from nanoengine.attention.torch_paged import PagedKVCache
from nanoengine.model.llama import head_dim_of
from nanoengine.sampling_params import SamplingParams
from nanoengine.scheduler.output import ScheduledRequest, SchedulerOutput
from nanoengine.worker.model_runner import ModelRunner

pytestmark = pytest.mark.l06

GREEDY = SamplingParams(temperature=0.0)


class LogitsRecorder(torch.nn.Module):
    """The model, keeping each batch of logits the runner asks it for."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: list[torch.Tensor] = []

    def forward(self, input_ids, positions, attention):
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden):
        self.logits.append(self.model.compute_logits(hidden))
        return self.logits[-1]


sequences = st.lists(
    st.tuples(
        st.integers(0, 3),  # the step it starts at
        st.lists(st.integers(1, 319), min_size=1, max_size=20),  # prompt
        st.integers(1, 4),  # tokens to generate
    ),
    min_size=1, max_size=4,
)


@pytest.mark.l06_t2
@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "qwen3-qknorm"])
@given(drawn=sequences, chunk=st.integers(1, 8), block_size=st.sampled_from([1, 3, 4, 16]), seed=st.integers(0, 2**16))
def test_each_sampled_sequence_gets_transformers_logits_at_its_end(name, drawn, chunk, block_size, seed, ours, hf):
    loaded, hf_model = ours(name), hf(name)
    config = loaded.hf_config
    counts = [math.ceil((len(prompt) + n) / block_size) for _, prompt, n in drawn]
    order = torch.randperm(sum(counts) + 2, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = [order[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(drawn))]
    cache = PagedKVCache(config.num_hidden_layers, len(order), block_size, config.num_key_value_heads,
                         head_dim_of(config), torch.float32)
    model = LogitsRecorder(loaded.model)
    runner = ModelRunner(model, cache, get_attention_backend("torch"))
    tokens = [list(prompt) for _, prompt, _ in drawn]
    computed, generated, step = [0] * len(drawn), [0] * len(drawn), 0
    while any(g < n for g, (_, _, n) in zip(generated, drawn)):
        scheduled = []
        for i, (start, _, n) in enumerate(drawn):
            if step < start or generated[i] == n:
                continue
            end = min(computed[i] + chunk, len(tokens[i]))
            scheduled.append(ScheduledRequest(f"r{i}", tokens[i][computed[i] : end], computed[i],
                                              tables[i][: math.ceil(end / block_size)], end == len(tokens[i]),
                                              GREEDY, []))
            computed[i] = end
        model.logits.clear()
        out = runner.execute(SchedulerOutput(step, scheduled, [], []))
        sampled = [int(s.request_id[1:]) for s in scheduled if s.sample]
        assert sorted(out.sampled_token_ids) == sorted(f"r{i}" for i in sampled), "exactly the finished chunks sample"
        logits = torch.cat(model.logits) if model.logits else torch.empty(0)
        assert len(logits) == len(sampled), "one row of logits per sampled sequence"
        for i, row in zip(sampled, logits):
            with torch.inference_mode():
                expected = hf_model(torch.tensor([tokens[i]])).logits[0, -1]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4, msg=f"r{i} after {len(tokens[i])} tokens")
            assert out.sampled_token_ids[f"r{i}"] == [int(row.argmax())]
            tokens[i].append(int(row.argmax()))
            generated[i] += 1
        step += 1
