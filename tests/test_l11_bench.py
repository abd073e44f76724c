"""Lesson 11's measurements: ``nanoengine bench perplexity`` scores text through the engine's
prompt log-probabilities (checked against transformers' own loss), and the bench commands
take ``--quantization`` and record the weights' resident bytes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoengine import LLM, cli
from nanoengine.bench.perplexity import perplexity, token_logprobs

pytestmark = pytest.mark.l11


def test_perplexity_through_the_engine_equals_transformers_loss(zoo_paths, hf):
    """Windows of 9 tokens over 30: each window's first token is unscored, so 30 - 4 logprobs."""
    token_ids = [(7 * i + 3) % 300 for i in range(30)]
    llm = LLM(str(zoo_paths["llama-gqa"]), dtype="float32", enable_prefix_caching=False, fast_path=False)
    logprobs = token_logprobs(llm, token_ids, window=9)
    assert len(logprobs) == 30 - 4
    model = hf("llama-gqa")
    losses = []
    with torch.inference_mode():
        for start in range(0, 30, 9):
            window = torch.tensor(token_ids[start : start + 9])[None]
            if window.shape[1] > 1:
                out = model(window, labels=window)
                losses.append(out.loss.item() * (window.shape[1] - 1))
    assert perplexity(logprobs) == pytest.approx(math.exp(sum(losses) / len(logprobs)), rel=1e-4)


def test_perplexity_needs_a_window_of_two():
    with pytest.raises(ValueError, match="window must be at least 2"):
        token_logprobs(None, [1, 2, 3], window=1)


def test_bench_perplexity_records_the_method_and_the_weights_bytes(zoo_paths, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    records = {}
    for method in [None, "int8"]:
        out = tmp_path / f"{method}.json"
        flags = ["--quantization", method] if method else []
        assert cli.main(["bench", "perplexity", str(zoo_paths["llama-gqa"]), "--text", str(text), "--window", "16",
                         "--dtype", "float32", *flags, "--result-json", str(out)]) == 0
        records[method] = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    assert records[None]["quantization"] is None and records["int8"]["quantization"] == "int8"
    assert records["int8"]["weight_bytes"] < records[None]["weight_bytes"]
    assert records[None]["num_scored_tokens"] == records["int8"]["num_scored_tokens"] > 0
    assert records["int8"]["perplexity"] != records[None]["perplexity"]


def test_bench_latency_takes_a_quantization(zoo_paths, tmp_path):
    out = tmp_path / "latency.json"
    assert cli.main(["bench", "latency", str(zoo_paths["llama-gqa"]), "--engine", "llm", "--input-len", "6",
                     "--output-len", "3", "--num-iters", "1", "--dtype", "bfloat16", "-q", "int4",
                     "--result-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["quantization"] == "int4" and record["weight_bytes"] > 0


def test_an_unknown_method_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "hi", "--quantization", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
