"""An OpenAI endpoint as the bench meets it: which model it serves, asked over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from hpc.errors import MTError


def first_model(base_url: str, api_key: str | None) -> str:
    """The id of the first model ``base_url``'s ``/models`` lists (what to benchmark when the
    user named an endpoint but no model)."""
    request = urllib.request.Request(base_url + "/models")  # noqa: S310 - the user's URL
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            listed = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MTError(
            f"cannot list the models at {base_url}/models: {exc}",
            hint="pass --model NAME, or check the URL (it should end with /v1)",
        ) from exc
    data = listed.get("data") if isinstance(listed, dict) else None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise MTError(f"{base_url}/models lists no model", hint="pass --model NAME")
    return str(data[0]["id"])
