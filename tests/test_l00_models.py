"""Lesson 00: nanoengine's models equal transformers on the tiny zoo (logits of a forward pass).

Greedy generation through the whole engine against transformers is lesson 06's test, where
the engine is built (test_l06_engine.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanoengine.attention import NoCache
from nanoengine.config import ModelConfig
from nanoengine.model import load_model, resolve_model_path
from tests.conftest import ZOO_NAMES

pytestmark = pytest.mark.l00

prompts = st.lists(st.integers(0, 319), min_size=1, max_size=48)


@pytest.mark.parametrize("name", ZOO_NAMES)
@given(prompt=prompts)
def test_logits_equal_transformers(name, prompt, ours, hf):
    loaded, hf_model = ours(name), hf(name)
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        hidden = loaded.model(ids, torch.arange(len(prompt)), NoCache())
        logits = loaded.model.compute_logits(hidden)
        expected = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32(dtype, zoo_paths, ours):
    """bf16/fp16 weights give logits close to float32's (a loose check: wrong casts are far off)."""
    half = load_model(ModelConfig(model=str(zoo_paths["llama-gqa"]), dtype=str(dtype).removeprefix("torch.")))
    full = ours("llama-gqa")
    assert half.model.model.embed_tokens.weight.dtype == dtype
    ids = torch.arange(0, 200, 7)
    with torch.inference_mode():
        a = half.model.compute_logits(half.model(ids, torch.arange(len(ids)), NoCache()))
        b = full.model.compute_logits(full.model(ids, torch.arange(len(ids)), NoCache()))
    assert (a - b).abs().max() < 0.25 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        resolve_model_path("some-org/some-model")
    with pytest.raises(ValueError, match="neither a bundled name"):
        resolve_model_path(str(tmp_path))  # a directory without config.json


def test_unsupported_architecture_is_named(zoo_paths, tmp_path):
    import json
    import shutil

    path = tmp_path / "gpt"
    shutil.copytree(zoo_paths["llama-gqa"], path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        load_model(ModelConfig(model=str(path), dtype="float32"))


def test_missing_checkpoint_tensor_is_named(zoo_paths, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(zoo_paths["llama-gqa"], path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_up_proj"):
        load_model(ModelConfig(model=str(path), dtype="float32"))


def test_max_model_len_beyond_the_model_is_refused(zoo_paths):
    with pytest.raises(ValueError, match="max_model_len=1000 exceeds"):
        load_model(ModelConfig(model=str(zoo_paths["llama-gqa"]), max_model_len=1000))


@pytest.mark.parametrize("kwargs, field", [({"dtype": "int3"}, "dtype"), ({"max_model_len": 0}, "max_model_len"),
                                           ({"device": "tpu"}, "device")])
def test_model_config_names_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)
