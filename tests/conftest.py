"""Fixtures: the tiny model zoo (saved once per test session) and loaders for both sides."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoengine import LLM
from nanoengine.config import ModelConfig
from nanoengine.engine.naive import NaiveEngine
from nanoengine.model import load_model
from nanoengine.model.loader import LoadedModel
from tests.zoo import ZOO, save_zoo

ZOO_NAMES = sorted(ZOO)


@pytest.fixture(scope="session")
def zoo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_zoo(tmp_path_factory.mktemp("zoo"))


@functools.cache
def _load_ours(path: Path) -> LoadedModel:
    return load_model(ModelConfig(model=str(path), dtype="float32"))


@functools.cache
def _load_hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def ours(zoo_paths):
    """``ours(name)``: the zoo model loaded by nanoengine in float32 (cached)."""
    return lambda name: _load_ours(zoo_paths[name])


@pytest.fixture(scope="session")
def hf(zoo_paths):
    """``hf(name)``: the same weights loaded by transformers, eager attention, float32 (cached)."""
    return lambda name: _load_hf(zoo_paths[name])


@functools.cache
def _llm(path: Path, prefix_caching: bool) -> LLM:
    return LLM(str(path), dtype="float32", fast_path=False, enable_prefix_caching=prefix_caching)


@pytest.fixture(scope="session")
def llm_for(zoo_paths):
    """``llm_for(name)``: a float32 ``LLM`` over a zoo model (cached), on the reference path: lesson
    15's fast path is held to it by its own tests. ``llm_for(name, prefix_caching=False)`` runs
    nothing of lesson 08, for lessons 06–07's tests."""
    return lambda name, prefix_caching=True: _llm(zoo_paths[name], prefix_caching)


@functools.cache
def _recompute_llm(path: Path) -> LLM:
    llm = LLM(str(path), dtype="float32", fast_path=False)
    llm.llm_engine = NaiveEngine(llm.loaded, kv_cache="none")
    return llm


@pytest.fixture(scope="session")
def recompute_llm_for(zoo_paths):
    """Like ``llm_for``, on lesson 01's recompute loop: lesson 01's tests need nothing of lesson 02."""
    return lambda name: _recompute_llm(zoo_paths[name])
