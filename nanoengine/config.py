"""Engine configuration: frozen, validated records built once from the user's arguments.

Every check happens in ``__post_init__`` so that a bad argument fails at ``LLM(...)`` with a
message naming the argument, before any weights are read. Later lessons add cache, scheduler
and parallel sub-configs beside :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to load, and how.

    Invariant: every field holds a value the loader accepts. ``model`` is ``None`` (the
    bundled default), a bundled name, a ``.gguf`` file or a Hugging Face directory; its
    existence is checked by the loader, which knows the bundled names.
    """

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"

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


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512MiB"``, ``"1GiB"`` or ``"2GB"`` (case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use bytes or a unit such as 512MiB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
