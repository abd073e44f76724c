"""The engine's logprobs (``token id -> Logprob`` per position) in OpenAI's two shapes.

Completions: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (one
``{token: logprob}`` dict per position) and ``text_offset`` (where each token starts in the
text). Chat: ``content``, a list of ``{token, logprob, bytes, top_logprobs: [...]}``.
JSON has no infinity, so an impossible token's ``-inf`` is sent as -9999.0 (as vLLM).
"""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerBase

from nanoengine.outputs import Logprob, PositionLogprobs

_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def _token_text(token_id: int, entry: Logprob | None, tokenizer: PreTrainedTokenizerBase) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def _top(position: PositionLogprobs, num_top: int) -> list[tuple[int, Logprob]]:
    """The ``num_top`` most likely tokens of a position (the chosen one is there only if it is among them)."""
    ranked = sorted(position.items(), key=lambda item: (item[1].rank or 0, -item[1].logprob))
    return ranked[:num_top]


class CompletionLogprobs:
    """Completions-style logprobs of one choice, built a range of positions at a time
    (streaming sends each chunk's positions); ``offset`` is where the next token's text starts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_top: int, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.num_top = num_top
        self.offset = offset

    def take(self, token_ids: list[int], logprobs: list[PositionLogprobs], first: int, last: int) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, position in zip(token_ids[first:last], logprobs[first:last]):
            entry = position.get(token_id)
            text = _token_text(token_id, entry, self.tokenizer)
            tokens.append(text)
            token_logprobs.append(finite(entry.logprob) if entry is not None else None)
            top = _top(position, self.num_top)
            top_logprobs.append({_token_text(t, e, self.tokenizer): finite(e.logprob) for t, e in top})
            text_offset.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


def _chat_entry(token_id: int, entry: Logprob | None, tokenizer: PreTrainedTokenizerBase) -> dict:
    text = _token_text(token_id, entry, tokenizer)
    return {"token": text, "logprob": finite(entry.logprob) if entry is not None else _FLOOR,
            "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_ids: list[int], logprobs: list[PositionLogprobs], first: int, last: int, num_top: int,
    tokenizer: PreTrainedTokenizerBase,
) -> dict:
    """Chat-style logprobs of positions ``first..last`` of one choice."""
    content = []
    for token_id, position in zip(token_ids[first:last], logprobs[first:last]):
        item = _chat_entry(token_id, position.get(token_id), tokenizer)
        item["top_logprobs"] = [_chat_entry(t, e, tokenizer) for t, e in _top(position, num_top)]
        content.append(item)
    return {"content": content}


def prompt_logprobs_json(prompt_logprobs: list[PositionLogprobs | None] | None) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs`` field: per prompt position, None or ``{token id: {logprob, rank, decoded_token}}``."""
    if prompt_logprobs is None:
        return None
    return [
        None if position is None else {
            str(t): {"logprob": finite(e.logprob), "rank": e.rank, "decoded_token": e.decoded_token}
            for t, e in position.items()
        }
        for position in prompt_logprobs
    ]
