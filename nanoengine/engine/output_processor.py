"""What happens to a request when a new token arrives, whatever engine produced the token.

Append it, stream its text, decide whether the sequence ends (EOS, stop token, stop string,
length), and give the user a snapshot. Every engine (lessons 01–04's one-at-a-time loop,
lesson 06's continuous batching) feeds tokens through the same :class:`OutputProcessor`.
"""

from __future__ import annotations

import time

from transformers import PreTrainedTokenizerBase

from nanoengine.engine.detokenizer import IncrementalDetokenizer
from nanoengine.engine.stop_checker import check_token_stop, find_stop_string
from nanoengine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanoengine.request import Request, RequestStatus


class OutputProcessor:
    """One request's text and stopping state.

    Invariant: ``text`` is the request's output text so far, cut before a matched stop
    string (or after it, with ``include_stop_str_in_output``); once the request has
    finished, no token is processed.
    """

    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
        self.request = request
        self.max_model_len = max_model_len
        params = request.params
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
            if params.detokenize
            else None
        )
        self.text = ""

    def process_token(self, token: int) -> RequestOutput:
        """Append ``token`` to the request, update its text and status, return its snapshot."""
        request, params = self.request, self.request.params
        if request.status.finished:
            raise RuntimeError(f"request {request.request_id} has already finished")
        request.output_token_ids.append(token)
        request.first_token_time = request.first_token_time or time.monotonic()
        stopped = check_token_stop(request, self.max_model_len)
        if self.detokenizer is not None:
            delta = self.detokenizer.add(token) + (self.detokenizer.flush() if stopped else "")
            self.text = self.detokenizer.text
            may_stop = request.status != RequestStatus.FINISHED_STOPPED
            if params.stop and may_stop and len(request.output_token_ids) >= params.min_tokens:
                match = find_stop_string(self.text, len(delta), params.stop, params.include_stop_str_in_output)
                if match is not None:
                    request.stop_reason, cut = match
                    request.status = RequestStatus.FINISHED_STOPPED
                    self.text = self.text[:cut]
        if request.status.finished:
            request.finished_time = time.monotonic()
        return make_request_output(request, self.text)


def make_request_output(request: Request, text: str) -> RequestOutput:
    """The user-facing snapshot of a request (copies, so later tokens do not leak into it)."""
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=list(request.output_token_ids),
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
    )
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=list(request.prompt_token_ids),
        prompt_logprobs=None,
        outputs=[completion],
        finished=request.status.finished,
        metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
    )
