"""What the fake engine (``bench.fakeengine``) answers: the bodies and chunks of OpenAI's
chat, completions and embeddings, its agent APIs and its other model endpoints.

The agent APIs stand for vLLM's ``/v1/responses`` (each response stored in the replica that made it:
a ``previous_response_id`` it did not make is a 404, as vLLM answers) and ``/v1/messages``
(Anthropic's events, ending with ``message_stop``), and for the engines' other model
endpoints (``/tokenize``, ``/detokenize``, ``/v1/rerank``, ``/v1/score``, and
``/v1/audio/transcriptions``, whose body is a multipart form), answered with what they
received: ``{"path", "model", "form"}``.
"""

from __future__ import annotations

import email.policy
import json
import time
from email.parser import BytesParser
from typing import Any

from aiohttp import web

AGENT_PATHS = ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens")
OTHER_PATHS = ("/tokenize", "/detokenize", "/v1/rerank", "/v1/score", "/v1/audio/transcriptions")


async def agent_answer(
    request: web.Request,
    payload: dict[str, Any],
    tokens: int,
    stream_cut: tuple[int | None, bool],
    stored: set[str],
    prefix: str,
) -> web.StreamResponse:
    """A Responses or Messages answer of ``tokens`` tokens (``tok0 tok1 …``), streamed if
    asked. ``stream_cut``: abort the connection after this many events, and leave out the
    last event (the knobs ``cut_after`` and ``omit_done``). A response's id is
    ``{prefix}_{n}``, added to ``stored``."""
    path, model = request.path, str(payload.get("model", "fake-model"))
    text = [f"tok{i} " for i in range(tokens)]
    if path == "/v1/messages/count_tokens":
        return web.json_response({"input_tokens": _words(payload)})
    events: list[tuple[str, dict[str, Any]]]
    if path == "/v1/responses":
        previous = payload.get("previous_response_id")
        if previous is not None and previous not in stored:
            message = f"Response with id '{previous}' not found."
            error = {"message": message, "type": "invalid_request_error", "param": None}
            body = {"error": {**error, "code": 404}}
            return web.json_response(body, status=404)
        rid = f"{prefix}_{len(stored)}"
        stored.add(rid)
        done = _response(rid, model, "".join(text), tokens)
        events = [("response.created", {"type": "response.created", "response": done})]
        events += [
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": t})
            for t in text
        ]
        events.append(("response.completed", {"type": "response.completed", "response": done}))
    else:
        done = _message(model, "".join(text), tokens)
        events = [("message_start", {"type": "message_start", "message": done})]
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": t}})
            for t in text
        ]  # fmt: skip
        events.append(("message_stop", {"type": "message_stop"}))
    if payload.get("stream") is not True:
        return web.json_response(done)
    cut_after, omit_last = stream_cut
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index, (name, data) in enumerate(events):
        if cut_after is not None and index > cut_after:
            if request.transport is not None:
                request.transport.abort()
            return response
        if omit_last and index == len(events) - 1:
            break
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    await response.write_eof()
    return response


def other_answer(request: web.Request, body: bytes) -> dict[str, Any]:
    """What an endpoint of ``OTHER_PATHS`` received: its path, the model, and a form's
    field names (None for JSON)."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
        )
        fields = {
            part.get_param("name", header="content-disposition"): part.get_content()
            for part in message.iter_parts()
        }
        return {"path": request.path, "model": fields.get("model"), "form": sorted(fields)}
    return {"path": request.path, "model": json.loads(body).get("model"), "form": None}


def _words(payload: dict[str, Any]) -> int:
    """One "token" per word of the messages' text (at least one)."""
    messages = payload.get("messages")
    texts = (
        [str(m.get("content", "")) for m in messages if isinstance(m, dict)]
        if isinstance(messages, list)
        else []
    )
    return max(1, len(" ".join(texts).split()))


def _response(rid: str, model: str, text: str, tokens: int) -> dict[str, Any]:
    """A whole Responses API answer."""
    item = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [item],
        "usage": {"input_tokens": 1, "output_tokens": tokens, "total_tokens": 1 + tokens},
    }


def _message(model: str, text: str, tokens: int) -> dict[str, Any]:
    """A whole Anthropic Messages answer."""
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": tokens},
    }


def answer(path: str, payload: dict[str, Any], tokens: int, model: str) -> dict[str, Any]:
    """A whole answer of OpenAI's completions, chat or embeddings."""
    created = int(time.time())
    text = "".join(f"tok{i} " for i in range(tokens))
    usage = usage_of(payload, tokens)
    if path.endswith("/embeddings"):
        return {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    if path.endswith("/chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
        kind = "text_completion"
    return {
        "id": "cmpl-fake",
        "object": kind,
        "created": created,
        "model": payload.get("model", model),
        "choices": [choice],
        "usage": usage,
    }


def usage_of(payload: dict[str, Any], tokens: int) -> dict[str, int]:
    """OpenAI's usage object for an answer of ``tokens`` tokens to ``payload``."""
    # One "token" per word of the prompt: enough for the bench's tokens-in column.
    messages = payload.get("messages")
    if isinstance(messages, list):
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        text = str(payload.get("prompt", ""))
    prompt = max(1, len(text.split()))
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


def chunk_of(model: str, chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    """One streamed chunk of a chat (``chat``) or text completion."""
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": "cmpl-fake",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
