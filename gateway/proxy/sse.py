"""SSE event bounds on the hot path: where an event ends, an engine's in-band error, [DONE].

Only bytes searches here: the relay parses no chunk as JSON. The in-band error the gateway
itself ends a stream with is ``hpc.openai.error_event``.
"""

from __future__ import annotations

from hpc.openai import DONE

# Bytes of the stream's end kept to see whether ``data: [DONE]`` came.
TAIL_BYTES = 32
# An event that waits for its end is sent anyway past this size (bounded memory).
MAX_CARRY_BYTES = 64 * 1024
# An engine's in-band error event starts with this after "data: " (vLLM, llama.cpp).
ERROR_KEY = b'{"error"'


def ends_done(tail: bytes) -> bool:
    """True if the stream's last bytes are its ``data: [DONE]`` event."""
    return tail.rstrip().endswith(DONE)


def engine_error_at(chunk: bytes) -> int:
    """Where an engine's in-band error event (``data: {"error": …}``) starts, or -1.

    One bytes search per chunk; only a hit is looked at more closely.
    """
    at = chunk.find(ERROR_KEY)
    while at >= 0:
        start = at - 6 if chunk[at - 6 : at] == b"data: " else at - 5
        if (
            start >= 0
            and chunk[start : start + 5] == b"data:"
            and (start == 0 or chunk[start - 1 : start] == b"\n")
        ):
            return start
        at = chunk.find(ERROR_KEY, at + 1)
    return -1


def event_separator(tail: bytes) -> bytes:
    """What to write so the next event starts on its own, after whatever came before."""
    if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\n\n"
