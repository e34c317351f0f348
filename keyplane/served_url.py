"""Where the running server says it can be reached, so ``keyplane connect`` prints the URL actually served.

``keyplane serve --port 9000`` knows its port; a later ``keyplane connect`` in another shell does not (the
flag is not in its environment). The server records its base URL under the home it uses; ``connect``
reads it back when neither ``--url`` nor ``KEYPLANE_PUBLIC_URL`` says otherwise, and says which it took.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyplane.config import Settings

FILE_NAME = "served-url.json"


def record(settings: Settings) -> None:
    """Write the base URL this server prints (best effort: a read-only home only loses the hint)."""
    path = settings.home / FILE_NAME
    try:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": settings.base_url}))
        tmp.replace(path)
    except OSError:
        pass


def _recorded(home: Path) -> str | None:
    try:
        url = json.loads((home / FILE_NAME).read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def assumed_base_url(settings: Settings, explicit: str | None = None) -> tuple[str, str]:
    """The base URL agents should use, and where it came from (for the reader to check)."""
    if explicit:
        return explicit.rstrip("/"), "--url"
    if settings.public_url:
        return settings.public_url, "KEYPLANE_PUBLIC_URL"
    recorded = _recorded(settings.home)
    if recorded:
        return recorded, f"the last `keyplane serve` on {settings.home}"
    return settings.base_url, "KEYPLANE_HOST/KEYPLANE_PORT (no server has run on this home yet)"
