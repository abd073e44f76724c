"""``LoRARequest``: which adapter a request runs with, spelled as vLLM's.

Plain Python (no torch): it rides on the request through the scheduler, whose prefix cache
keys blocks by the adapter (lesson 14), and across to the worker in the step's plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True, slots=True)
class LoRARequest:
    """A PEFT adapter to apply to a request: a name for people, an id for the engine, a path.

    ``lora_int_id`` (a positive integer) is what the engine keys the adapter by: two
    requests with the same id share one loaded copy and their cached prefix blocks, so one
    id must always mean one adapter. ``lora_path``: a directory holding PEFT's
    ``adapter_config.json`` and ``adapter_model.safetensors``.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string; got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer; got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, Path)):
            raise ValueError(f"lora_path must be a directory path; got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", str(self.lora_path))

    @property
    def cache_keys(self) -> tuple:
        """What this adapter adds to every block hash of its requests (lesson 08's
        ``extra_keys``): K/V computed under one adapter never serve another."""
        return (("lora", self.lora_int_id),)
