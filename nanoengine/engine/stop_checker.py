"""When does a sequence end? EOS, a stop token, a stop string, or its length limit."""

from __future__ import annotations

import time

from nanoengine.request import Request, RequestStatus


def find_stop_string(text: str, new_chars: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """The first stop string that the last ``new_chars`` characters completed, if any.

    Returns the stop string and the length to cut ``text`` to: before the stop string, or
    after it when ``include``. Only the tail that could contain a new match is searched.
    """
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1:
            return stop, index + (len(stop) if include else 0)
    return None


def check_token_stop(request: Request, max_model_len: int) -> bool:
    """Finish ``request`` if its newest token ends it; return True if it did.

    Order as vLLM: nothing stops before ``min_tokens`` (EOS and stop tokens were masked out
    of sampling until then), then EOS (unless ``ignore_eos``), stop token ids, and last the
    length limits (``max_tokens``, and ``max_model_len`` for the whole sequence).
    """
    params, last = request.params, request.output_token_ids[-1]
    num_output = len(request.output_token_ids)
    if num_output >= params.min_tokens:
        if not params.ignore_eos and last in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if last in params.stop_token_ids:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, last
            return True
    if request.num_tokens >= request.max_total_tokens(max_model_len):
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False


def append_token(request: Request, token: int, max_model_len: int) -> bool:
    """Append a sampled token to ``request`` and finish it if the token ends it (EOS, a stop
    token, a length limit); return True if it did. Only the request's owner calls this: the
    scheduler in lesson 06's engine, the engine itself in lessons 01–04's loop. The output
    processor reads the request and reports a stop string (:func:`stop_on_string`) instead
    of writing it, so one place decides a request's state."""
    request.output_token_ids.append(token)
    request.first_token_time = request.first_token_time or time.monotonic()
    if not check_token_stop(request, max_model_len):
        return False
    request.finished_time = time.monotonic()
    return True


def stop_on_string(request: Request, stop: str) -> None:
    """Finish ``request`` on the stop string its text just completed (the owner's write)."""
    request.stop_reason, request.status = stop, RequestStatus.FINISHED_STOPPED
    request.finished_time = time.monotonic()
