"""Structured (JSON) logs. Secrets never reach a log line: a filter masks anything token-shaped."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_TOKEN = re.compile(r"mcp_s[ak]_[0-9A-Za-z]{4,}")


def redact(text: str) -> str:
    """Replace anything that looks like a keyplane token with its mask-like form."""
    return _TOKEN.sub(lambda m: m.group(0)[:11] + "…[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # Alembic announces each of its plugins at INFO on every migration: noise in a first start's output.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # ... and each migration step at INFO: keyplane logs one line for the whole upgrade instead.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
