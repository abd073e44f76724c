"""What happens to a request when a new token arrives, whatever engine produced the token.

Append it, stream its text, decide whether the sequence ends (EOS, stop token, stop string,
length), and give the user a snapshot. Every engine (lessons 01–04's one-at-a-time loop,
lesson 06's continuous batching) feeds tokens through the same :class:`OutputProcessor`;
a :class:`RequestState` gathers a request's sequences (``n`` of them after a fork, lesson
08) and its prompt logprobs into one :class:`RequestOutput`, shaped as the request's
``SamplingParams.output_kind`` asks: everything so far, only what is new, or only the end.
Nothing here copies a request's history per step except a ``CUMULATIVE`` snapshot, which
is what that kind asks for.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from nanoengine.engine.detokenizer import IncrementalDetokenizer
from nanoengine.engine.stop_checker import find_stop_string
from nanoengine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from nanoengine.request import Request, RequestStatus
from nanoengine.sampling import TokenLogprobs
from nanoengine.sampling_params import RequestOutputKind, SamplingParams


def position_logprobs(entry: TokenLogprobs, tokenizer: PreTrainedTokenizerBase | None) -> PositionLogprobs:
    """The user-facing form of one position's logprobs: token id -> Logprob, with each
    token's text when a tokenizer is given (None: the request asked for no text)."""
    return {
        token: Logprob(logprob, rank, None if tokenizer is None else tokenizer.decode([token]))
        for token, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)
    }


class TextStream:
    """A sequence's text as its tokens arrive: incremental detokenization and stop strings.

    Used in the engine (offline) and, in front of a separate engine process, by the async
    engine, so text is made in one way only. Invariant: ``text`` is the output text so far,
    cut before a matched stop string (after it with ``include_stop_str_in_output``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.text = ""

    def add(self, token: int, num_output: int, last: bool, stopped_by_token: bool) -> str | None:
        """Append the sequence's ``num_output``-th token (``last``: the sequence ends with it;
        ``stopped_by_token``: it ended on EOS or a stop token). Returns the stop string the
        token completed, if any; the sequence then ends here, its text cut."""
        delta = self.detokenizer.add(token) + (self.detokenizer.flush() if last else "")
        self.text = self.detokenizer.text
        params = self.params
        if not params.stop or stopped_by_token or num_output < params.min_tokens:
            return None
        match = find_stop_string(self.text, len(delta), params.stop, params.include_stop_str_in_output)
        if match is None:
            return None
        stop, cut = match
        self.text = self.text[:cut]
        return stop


class OutputProcessor:
    """One sequence's text and logprobs, read from its request (which its owner writes).

    Invariants: ``text`` is the sequence's output text so far (see :class:`TextStream`); once
    the sequence has finished, no token is observed. ``sent_tokens`` / ``sent_chars``: how
    many of its tokens (and logprobs) and text characters earlier ``DELTA`` outputs carried.
    """

    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase, max_model_len: int, index: int = 0) -> None:
        self.request = request
        self.max_model_len = max_model_len
        self.index = index
        params = request.params
        self.tokenizer = tokenizer if params.detokenize else None
        self.text_stream = TextStream(tokenizer, request.prompt_token_ids, params) if params.detokenize else None
        self.logprobs: list[PositionLogprobs] | None = None if params.logprobs is None else []
        self.cumulative_logprob: float | None = None if params.logprobs is None else 0.0
        self.sent_tokens = self.sent_chars = 0
        # DELTA text waits while its end could still begin a stop string (which would be cut)
        self.held_chars = 0 if params.include_stop_str_in_output else max(map(len, params.stop), default=1) - 1

    @property
    def text(self) -> str:
        return "" if self.text_stream is None else self.text_stream.text

    def observe(self, token: int, logprobs: TokenLogprobs | None, ended: bool) -> str | None:
        """Take the sequence's newest token, which its owner has just appended to the request
        (``ended``: the token ended it: EOS, a stop token or a length limit): its logprobs and
        its text. Returns the stop string the token completed, if any; the owner then ends the
        sequence there (:func:`~nanoengine.request.stop_on_string`). Nothing here
        writes the request."""
        request = self.request
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(position_logprobs(logprobs, self.tokenizer))
            self.cumulative_logprob += logprobs.logprobs[0]
        if self.text_stream is None:
            return None
        by_token = request.status == RequestStatus.FINISHED_STOPPED
        return self.text_stream.add(token, len(request.output_token_ids), ended, by_token)

    def completion(self) -> CompletionOutput:
        """The sequence so far (copies, so later tokens do not leak into it)."""
        return self._since(0, 0, len(self.text))

    def delta(self) -> CompletionOutput:
        """What the sequence gained since the last call: new tokens and logprobs, new text
        (all of it once finished, else short of ``held_chars``); costs only what is new."""
        text_length = len(self.text)
        ready = text_length if self.request.status.finished else max(self.sent_chars, text_length - self.held_chars)
        completion = self._since(self.sent_tokens, self.sent_chars, ready)
        self.sent_tokens, self.sent_chars = len(self.request.output_token_ids), ready
        return completion

    def _since(self, first_token: int, first_char: int, last_char: int) -> CompletionOutput:
        """Tokens and logprobs from ``first_token`` on, text ``[first_char, last_char)``, and
        the sequence's current totals and finish state (new lists: nothing aliases its own)."""
        request = self.request
        return CompletionOutput(
            index=self.index,
            text=self.text[first_char:last_char],
            token_ids=request.output_token_ids[first_token:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else self.logprobs[first_token:],
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
        )


class RequestState:
    """One user request as the engine answers it: its sequences and its prompt logprobs.

    Invariants: ``sequences`` maps the id of every sequence (the request itself, or its
    ``n`` children once forked) to its processor; the request has finished when every
    sequence has.
    """

    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.sequences = {request.request_id: OutputProcessor(request, tokenizer, max_model_len)}
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            None if request.params.prompt_logprobs is None else [None]
        )
        self.prompt_sent = False  # DELTA: the prompt goes with the request's first output

    def fork(self, children: list[Request]) -> None:
        """The request became ``n`` sequences, numbered in order."""
        self.sequences = {
            child.request_id: OutputProcessor(child, self.tokenizer, self.max_model_len, index)
            for index, child in enumerate(children)
        }

    def add_prompt_logprobs(self, first: int, entries: list[TokenLogprobs]) -> None:
        """Entries for prompt tokens ``first, first + 1, ...``; a prompt computed again after
        preemption repeats positions already known, which are kept as they were."""
        known = len(self.prompt_logprobs)
        tokenizer = self.tokenizer if self.request.params.detokenize else None
        self.prompt_logprobs.extend(position_logprobs(e, tokenizer) for e in entries[max(0, known - first):])

    @property
    def finished(self) -> bool:
        return all(p.request.status.finished for p in self.sequences.values())

    def live_sequence_ids(self) -> list[str]:
        return [rid for rid, p in self.sequences.items() if not p.request.status.finished]

    def output(self) -> RequestOutput | None:
        """The user-facing output of this step, as ``params.output_kind`` asks: the whole
        request so far (``CUMULATIVE``), what is new since the last output (``DELTA``), or
        None until the request has finished (``FINAL_ONLY``, then the whole request)."""
        request = self.request
        kind = request.params.output_kind
        finished = self.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        processors = list(self.sequences.values())
        finished_times = [p.request.finished_time for p in processors]
        first_times = [p.request.first_token_time for p in processors if p.request.first_token_time is not None]
        delta = kind == RequestOutputKind.DELTA
        with_prompt = not (delta and self.prompt_sent)
        self.prompt_sent = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids) if with_prompt else [],
            prompt_logprobs=None if self.prompt_logprobs is None or not with_prompt else list(self.prompt_logprobs),
            outputs=[p.delta() if delta else p.completion() for p in processors],
            finished=finished,
            metrics=RequestMetrics(
                request.arrival_time,
                min(first_times, default=None),
                max(finished_times) if finished else None,
            ),
            lora_request=request.lora_request,
        )
