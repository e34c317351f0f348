"""The model a request names, as a usage event records it: served, failed or refused alike.

A refused request (401 with a known key, 403, 429) is answered before the body is forwarded, but its
usage event should still say which model it asked for, so that ``group_by=model`` puts a 429 under the
model that was refused rather than under "(none)". The body is already in memory (bounded by
``max_body_bytes``); it is read only for refusals of a known key, after the answer went out, and at
a bounded cost whatever the body's size, since refusals are what a flood gets: a body up to 64 KiB is
parsed exactly; in a larger one only the first and the last 32 KiB are searched for a
``"model": "…"`` pair (where a model-first client and one that sends ``messages`` first put it). A
model sitting in the middle of a large body is left unknown (None).
"""

from __future__ import annotations

import re

import orjson

MAX_MODEL_CHARS = 200  # the usage_events.model column
PARSED_BODY_BYTES = 64 * 1024  # up to this size a body is parsed; beyond it, searched at both ends
SEARCHED_BYTES = 32 * 1024
_MODEL_PAIR = re.compile(rb'"model"\s*:\s*"([^"\\\x00-\x1f\x7f]{1,%d})"' % MAX_MODEL_CHARS)
_CANDIDATES = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def recorded_model(model: object) -> str | None:
    """A model name fit for a usage event: a non-empty string, cut to the column, no control characters."""
    if not isinstance(model, str) or not model:
        return None
    model = model[:MAX_MODEL_CHARS]
    if model.isprintable():  # the usual case, checked in C: no control character at all
        return model
    return None if _CONTROL.search(model) else model


def model_named(body: bytes) -> str | None:
    """The ``model`` a JSON object body names; None for anything else (never raises)."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    if len(body) <= PARSED_BODY_BYTES:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return recorded_model(request.get("model")) if isinstance(request, dict) else None
    for window in (body[:SEARCHED_BYTES], body[-SEARCHED_BYTES:]):
        at = window.find(b'"model"')
        for _ in range(_CANDIDATES):
            if at < 0:
                break
            pair = _MODEL_PAIR.match(window, at)
            if pair is not None:
                return recorded_model(pair.group(1).decode("utf-8", "replace"))
            at = window.find(b'"model"', at + 7)
    return None
