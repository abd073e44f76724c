"""Where a stop string ends a sequence's text. (EOS, stop tokens and length limits end the
request itself: :func:`nanoengine.request.append_token`.)"""

from __future__ import annotations


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
