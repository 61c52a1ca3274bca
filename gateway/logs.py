"""JSON log lines: one object per line, for the gateway's request and reload logs.

Code logs through the stdlib ``logging`` module and puts its structured fields under
``extra={"fields": {...}}``; ``JsonFormatter`` merges them into the line. Nothing here ever
sees a key or an Authorization header: callers pass only the fields they mean to log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

LOGGER_NAME = "gateway"
FIELDS = "fields"


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("request", extra=fields(status=200))``."""
    return {FIELDS: values}


class JsonFormatter(logging.Formatter):
    """``{"ts": …, "level": …, "msg": …, <fields>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (no trailing newline)."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        extra = getattr(record, FIELDS, None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs (a type of its own so it can be replaced)."""


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send the gateway's logs to ``stream`` (stderr) as JSON lines; safe to call twice."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _JsonHandler)]:
        logger.removeHandler(old)
    handler = _JsonHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
