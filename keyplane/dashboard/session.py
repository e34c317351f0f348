"""Dashboard sessions: an encrypted, expiring cookie that carries the service-account token.

Every request re-authenticates the token (cached, like every other credential check), so revoking the
account ends its sessions at once, and any process with the same master key can serve any session. The
cookie is AES-GCM sealed under the master key (nobody can read or forge it), HttpOnly and
SameSite=Strict (Secure under HTTPS). Each session has its own CSRF token, required on every change.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

from keyplane.domain.secrets_box import SecretBox

COOKIE = "keyplane_session"
CONTEXT = "dashboard-session"  # AES-GCM associated data: a sealed provider secret is not a session
LIFETIME_SECONDS = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    csrf: str
    expires_at: float

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf.encode(), presented.encode())


def new_session(token: str, lifetime: float = LIFETIME_SECONDS) -> Session:
    return Session(token=token, csrf=secrets.token_urlsafe(24), expires_at=time.time() + lifetime)


def seal(box: SecretBox, session: Session) -> str:
    payload = orjson.dumps({"t": session.token, "c": session.csrf, "e": session.expires_at}).decode()
    return box.seal(payload, CONTEXT)


def open_session(box: SecretBox, cookie: str | None) -> Session | None:
    """The session in a cookie, or None if absent, tampered with, or expired."""
    if not cookie:
        return None
    try:
        data = orjson.loads(box.open(cookie, CONTEXT))
        session = Session(token=str(data["t"]), csrf=str(data["c"]), expires_at=float(data["e"]))
    except Exception:
        return None
    return session if session.expires_at > time.time() else None
