"""Benchmark prompts: random token ids from a fixed seed, so every run measures the same work,
or a JSONL file of real prompts."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path


def random_token_prompts(
    input_lens: Sequence[int], vocab_size: int, seed: int = 0, prefix_len: int = 0
) -> list[list[int]]:
    """One prompt per entry of ``input_lens``: the same ``prefix_len`` ids (a system prompt, as
    vLLM's ``--random-prefix-len``) followed by that many ids of its own, all drawn uniformly
    from the vocabulary."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(vocab_size) for _ in range(n)] for n in input_lens]


def realistic_lengths(num_requests: int, max_model_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths with a chat workload's long tail: log-normal, median prompt
    ~200 and output ~150 tokens, clipped to [8, 2048] and [4, 1024] and to ``max_model_len``."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(num_requests):
        prompt = min(2048, max(8, round(rng.lognormvariate(math.log(200), 0.8))))
        output = min(1024, max(4, round(rng.lognormvariate(math.log(150), 0.9))))
        prompt = min(prompt, max_model_len - 1)
        lengths.append((prompt, min(output, max_model_len - prompt)))
    return lengths


def random_lengths(num_requests: int, input_len: int, output_len: int, range_ratio: float, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths drawn uniformly from ``[len * (1 - r), len * (1 + r)]``, as
    vLLM's random dataset does; ``range_ratio`` 0 gives every request the same lengths."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1); got {range_ratio}")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        return rng.randint(max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio))))

    return [(draw(input_len), draw(output_len)) for _ in range(num_requests)]


@dataclasses.dataclass(slots=True, frozen=True)
class DatasetRequest:
    """One line of a JSONL dataset: a prompt as text or as token ids, and the output length it
    asks for (None: the benchmark's ``--output-len``)."""

    prompt: str | list[int]
    output_len: int | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_line(text: str) -> DatasetRequest:
    """One JSONL line; raises ValueError saying what is wrong with it."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(item, dict) or ("prompt" in item) == ("prompt_token_ids" in item):
        raise ValueError('expected an object with exactly one of "prompt" (text) or "prompt_token_ids" (list of ints)')
    prompt = item.get("prompt", item.get("prompt_token_ids"))
    if "prompt" in item and not (isinstance(prompt, str) and prompt):
        raise ValueError('"prompt" must be a non-empty string')
    if "prompt_token_ids" in item and not (isinstance(prompt, list) and prompt and all(map(_is_int, prompt))):
        raise ValueError('"prompt_token_ids" must be a non-empty list of integers')
    output_len = item.get("output_len")
    if output_len is not None and not (_is_int(output_len) and output_len > 0):
        raise ValueError('"output_len" must be a positive integer')
    return DatasetRequest(prompt, output_len)


def load_jsonl_dataset(path: str | Path) -> list[DatasetRequest]:
    """Every non-blank line of ``path``, each a JSON object with ``"prompt"`` (text) or
    ``"prompt_token_ids"`` (ids) and optionally ``"output_len"``. A bad line is reported with
    the file and line number, so a large hand-made dataset is quick to fix."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except OSError as exc:
        raise ValueError(f"cannot read the dataset {path}: {exc.strerror}") from None
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            requests.append(_parse_line(line))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
    if not requests:
        raise ValueError(f"{path}: the dataset has no requests")
    return requests
