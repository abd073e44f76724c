"""Incremental detokenization: text deltas as tokens arrive, safe for multi-byte characters.

Byte-level tokenizers split one UTF-8 character across tokens, so decoding the newest
token alone can give half a character (shown as U+FFFD). And SentencePiece tokenizers
decode a token differently at the start of a string (no leading space). Both are solved by
decoding a short window of recent tokens twice: the already-emitted part (``prefix``) and
the window including new tokens; the new text is the difference, emitted only once it no
longer ends in U+FFFD. Cost per token stays constant, not proportional to the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# How many prompt tokens give the first output token its left context.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Accumulates a sequence's output text token by token.

    Invariant: ``text`` equals the decoding of the output tokens up to ``read_offset``
    (in window coordinates); tokens after ``read_offset`` are pending, waiting for the rest
    of a character.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes ("" while a character is partial)."""
        # BEGIN SOLUTION L01.T3
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta
        # END SOLUTION

    def flush(self) -> str:
        """At the end of the sequence: whatever is still pending, even a partial character."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += delta
        return delta
