"""Finding keyplane secrets in free text: exact, by the key format's checksum (DESIGN.md "Key format").

A name, label, scope string or description that holds a well-formed ``mcp_sk_``/``mcp_sa_`` secret is
refused at the edge (every adapter builds the same schemas), and anything written to the audit log
is masked as a second line of defence. Text that merely looks like a key (a mask, a typo) is left
alone: the CRC32 checksum tells a real secret apart.
"""

from __future__ import annotations

import re
from typing import Any

from keyplane.domain import tokens

REFUSAL_MESSAGE = "a keyplane secret was detected (an mcp_sk_/mcp_sa_ token): never paste one into a free-text field"
_CANDIDATE = re.compile(rf"mcp_s[ak]_(?=[0-9A-Za-z]{{{tokens.BODY_LEN}}})")
_LENGTH = len(tokens.VIRTUAL_KEY_PREFIX) + tokens.BODY_LEN


def _secrets_in(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _CANDIDATE.finditer(text):
        start = match.start()
        token = text[start:start + _LENGTH]
        if tokens.is_well_formed(token, token[: len(tokens.VIRTUAL_KEY_PREFIX)]):
            spans.append((start, start + _LENGTH))
    return spans


def contains_secret(text: str) -> bool:
    return "mcp_s" in text and bool(_secrets_in(text))


def mask_text(text: str) -> str:
    """``text`` with every well-formed secret replaced by its display mask."""
    if "mcp_s" not in text:
        return text
    spans = _secrets_in(text)
    if not spans:
        return text
    out, last = [], 0
    for start, end in spans:
        out.append(text[last:start])
        out.append(tokens.mask(text[start:end]))
        last = end
    out.append(text[last:])
    return "".join(out)


def mask(value: Any) -> Any:
    """A JSON-like value with every secret in its strings (keys included) masked."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {mask(k): mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask(v) for v in value]
    return value


def refuse_secret(value: str) -> str:
    """A pydantic after-validator for free text: raises ValueError naming the problem, never the secret."""
    if contains_secret(value):
        raise ValueError(REFUSAL_MESSAGE)
    return value
