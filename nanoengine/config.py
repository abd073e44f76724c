"""Engine configuration: frozen, validated records built once from the user's arguments.

Every check happens in ``__post_init__`` so that a bad argument fails at ``LLM(...)`` with a
message naming the argument, before any weights are read. The engine is built from a
:class:`ModelConfig`, a :class:`CacheConfig` and a :class:`SchedulerConfig`, spread over
ranks by a :class:`ParallelConfig` (lesson 12), and given LoRA adapter slots by a
:class:`LoRAConfig` (lesson 14).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from nanoengine.quant.registry import check_quantization_name

DTYPES = ("auto", "float32", "bfloat16", "float16")
# What LLM(task=...) does with the model (lesson 16): "auto" embeds with encoders, else generates.
TASKS = ("auto", "generate", "embed")
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to load, and how.

    Invariant: every field holds a value the loader accepts. ``model`` is ``None`` (the
    bundled default), a bundled name, a ``.gguf`` file or a Hugging Face directory; its
    existence is checked by the loader, which knows the bundled names. ``fast_path`` turns on
    lesson 15's speed-ups (prepacked oneDNN weights on a bf16 CPU, the fast attention
    backend); off, the model runs the reference path the correctness tests use.
    ``enforce_eager`` (vLLM's name) keeps the fast path's kernels but runs a decode step
    module by module, as before lesson 17, instead of as one fused call.
    ``batch_invariant`` (vLLM's name): every row's arithmetic is independent of the batch, so a
    greedy request gives the same tokens alone, in any batch, chunked or from the prefix cache
    (``nanoengine.model.batch_invariant``; a CPU mode, and a slower one).
    ``quantization`` names a lesson-11 method (``nanoengine.quant.registry``) or is None.
    """

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"
    fast_path: bool = False
    enforce_eager: bool = False
    batch_invariant: bool = False
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, Path)):
            raise ValueError(f"model must be a path or a bundled model name, got {type(self.model).__name__}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise ValueError(f"max_model_len must be a positive integer or None; got {self.max_model_len!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if not isinstance(self.fast_path, bool):
            raise ValueError(f"fast_path must be a bool; got {self.fast_path!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool; got {self.enforce_eager!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be a bool; got {self.batch_invariant!r}")
        if self.batch_invariant and (self.device == "cuda" or self.dtype == "float16"):
            raise ValueError(f"batch_invariant=True runs float32 or bfloat16 on the CPU; got device={self.device!r}, "
                             f"dtype={self.dtype!r}")
        check_quantization_name(self.quantization)


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    """KV cache geometry and budget.

    ``kv_cache_memory_bytes`` wins when given; otherwise the engine takes
    ``gpu_memory_utilization`` of the GPU's memory (minus the weights), or on a CPU
    ``CPU_KV_SHARE`` of the RAM available at start-up. ``enable_prefix_caching``: full
    blocks stay cached for later requests with the same prefix (lesson 08).
    """

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool; got {self.enable_prefix_caching!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How much work one engine step may take.

    ``max_num_batched_tokens`` is the token budget of a step (prefill chunks plus decode
    tokens); None means 2048 with chunked prefill, else the model's length, so a whole
    prompt always fits. It must be at least ``max_num_seqs`` (as vLLM), so every running
    request can decode in every step.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool; got {self.enable_chunked_prefill!r}")

    def token_budget(self, max_model_len: int) -> int:
        """The per-step token budget, resolved against the model's length."""
        if self.max_num_batched_tokens is not None:
            if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
                raise ValueError(
                    f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                    f"least max_model_len ({max_model_len}), or a long prompt could never be scheduled"
                )
            return self.max_num_batched_tokens
        return max(2048, self.max_num_seqs) if self.enable_chunked_prefill else max(max_model_len, self.max_num_seqs)


EXECUTOR_BACKENDS = ("mp", "torchrun")


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How many ranks share the model, and how they start (lesson 12).

    ``tensor_parallel_size`` ranks split every layer; ``pipeline_parallel_size`` stages split
    the stack of layers; one engine drives ``tensor_parallel_size * pipeline_parallel_size``
    ranks (its ``world_size``). ``data_parallel_size`` engines, each with its own world, serve
    behind one server (``nanoengine serve`` balances requests across them).
    ``distributed_executor_backend``: ``"mp"`` spawns the ranks on this machine;
    ``"torchrun"`` joins ranks that torchrun started, on this machine or several.
    ``timeout_s``: how long a rank waits for the others in a collective before giving up.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("pipeline_parallel_size", self.pipeline_parallel_size)
        _positive_int("data_parallel_size", self.data_parallel_size)
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}; "
                             f"got {self.distributed_executor_backend!r}")
        if not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds; got {self.timeout_s!r}")

    @property
    def world_size(self) -> int:
        """Ranks per engine (data-parallel replicas each have their own)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclasses.dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Multi-LoRA serving (lesson 14): ``max_loras`` adapters may run in one step (each has a
    slot in every adapted layer); ``max_lora_rank``: the largest rank an adapter may have
    (every slot is sized for it)."""

    max_loras: int = 4
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        _positive_int("max_loras", self.max_loras)
        _positive_int("max_lora_rank", self.max_lora_rank)


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (lesson 10), spelled as vLLM's ``speculative_config`` dict.

    ``method``: ``"ngram"`` proposes the tokens that followed the latest earlier occurrence
    of the sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens (prompt
    lookup); ``"draft_model"`` runs a smaller model with the same tokenizer: ``model`` (a
    path or bundled name; None: the target itself), cut to its first ``draft_num_layers``
    layers when given (LayerSkip-style self-speculation, sharing the target's weights).
    Each speculating request proposes up to ``num_speculative_tokens`` tokens per step;
    ``disable_by_batch_size``: nobody guesses in a step that has at least this many running
    requests (a large batch has no spare compute to spend on guesses).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    draft_num_layers: int | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {self.method!r}")
        _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        _positive_int("prompt_lookup_max", self.prompt_lookup_max)
        _positive_int("prompt_lookup_min", self.prompt_lookup_min)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be at most "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        _positive_int("draft_num_layers", self.draft_num_layers, allow_none=True)
        _positive_int("disable_by_batch_size", self.disable_by_batch_size, allow_none=True)
        if self.method == "ngram" and (self.model is not None or self.draft_num_layers is not None):
            raise ValueError("speculative_config: model and draft_num_layers belong to method 'draft_model'")
        if self.model is not None and not isinstance(self.model, (str, Path)):
            raise ValueError(f"speculative_config model must be a path or a bundled name; got {self.model!r}")

    @classmethod
    def from_dict(cls, config: dict | None) -> SpeculativeConfig | None:
        """The config from vLLM's dict form (None: no speculation); unknown keys are errors."""
        if config is None:
            return None
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict; got {type(config).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {', '.join(fields)}")
        missing = [name for name in ("method", "num_speculative_tokens") if name not in config]
        if missing:
            raise ValueError(f"speculative_config needs {' and '.join(missing)}")
        return cls(**config)


def speculative_config_flag(text: str) -> dict:
    """The ``--speculative-config`` flag's argparse type: a JSON object, checked now (so a bad
    one fails before any weights load, with argparse's usage line) and returned as the dict
    ``LLM(speculative_config=...)`` takes."""
    try:
        config = json.loads(text)
        SpeculativeConfig.from_dict(config)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}); "
                                         'e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return config


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512MiB"``, ``"1GiB"`` or ``"2GB"`` (case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use bytes or a unit such as 512MiB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def add_fast_path_arg(p: argparse.ArgumentParser) -> None:
    """``--fast-path`` (default) / ``--no-fast-path``: lesson 15's kernels or the reference path;
    ``--enforce-eager``: the fast kernels, but a decode step module by module (lesson 17);
    ``--batch-invariant``: batch-invariant mode (:class:`ModelConfig`)."""
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                   help="lesson 15's fast kernels (--no-fast-path: the reference path)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run a decode step module by module instead of as one fused call (lesson 17)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="the same greedy tokens for a request whatever else is batched with it (CPU; slower)")
