"""SamplingParams: how to pick each next token and when to stop, with vLLM's fields and defaults.

Every value is checked when the object is built, so a bad request fails before any work
starts, with a ``ValueError`` that names the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import enum

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What the engine's outputs for a request carry, step after step (vLLM's names).

    ``CUMULATIVE``: everything so far, every step (a new copy each time, so its cost grows
    with the request); ``DELTA``: only what is new since the request's last output (the
    prompt with the first one; text held back while it could still be the start of a stop
    string); ``FINAL_ONLY``: one output, when the request finishes. ``LLM.generate`` asks
    for ``FINAL_ONLY``; the server's engine process sends ``DELTA``.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings (vLLM's meanings and defaults).

    Invariants after construction: ``stop`` and ``stop_token_ids`` are lists; ``top_k`` is
    ``0`` when off (``-1`` is accepted and normalised); a greedy request (``temperature``
    below 1e-5) has its truncation settings reset, since they cannot change an argmax.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _check_float("temperature", self.temperature, 0.0, None)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63))
            if self.seed >= 2**64:
                raise ValueError(f"seed must be below 2**64; got {self.seed}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}); got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if isinstance(self.output_kind, bool) or self.output_kind not in tuple(RequestOutputKind):
            raise ValueError(f"output_kind must be one of {', '.join(k.name for k in RequestOutputKind)}; "
                             f"got {self.output_kind!r}")
        self.output_kind = RequestOutputKind(self.output_kind)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True: they are matched against text")
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < _GREEDY_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature < _GREEDY_EPS


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}; got {value}")


def _check_float(
    name: str, value: object, low: float, high: float | None, low_open: bool = False
) -> None:
    if not _is_number(value) or value != value:  # NaN fails value != value
        raise ValueError(f"{name} must be a number; got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        right = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {left}{low}, {right}; got {value}")


def _normalise_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"stop must be a non-empty string or a list of them; got {stop!r}")
    return list(items)


def _normalise_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise ValueError(f"stop_token_ids must be a list of non-negative integers; got {ids!r}")
    return list(ids)


def _normalise_logit_bias(bias: object) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers; got {bias!r}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids; got {key!r}") from None
        if not _is_number(value) or not -100.0 <= value <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100]; got {value!r} for {key!r}")
        out[token] = float(value)
    return out
