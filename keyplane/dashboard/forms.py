"""Reading the dashboard's forms, and saying what was wrong with them."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from keyplane.domain.errors import KeyplaneError


def _error_text(exc: KeyplaneError | ValidationError | ValueError) -> str:
    if isinstance(exc, KeyplaneError):
        return f"{exc.message} ({exc.code})"
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def _status_of(exc: KeyplaneError | ValidationError | ValueError) -> int:
    """A refused change answers with the service's status (404, 409, …); bad form input with 400."""
    return exc.status if isinstance(exc, KeyplaneError) else 400


def _optional_number(form: Any, name: str, kind: type[int] | type[float] = int) -> Any:
    """A form field as a number, or None when empty; a clear message when it is not one."""
    raw = str(form.get(name) or "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}: {what}, not '{raw}'") from None


def _lines(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").replace(",", "\n").splitlines() if part.strip()]


def _pairs(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        if "=" not in line:
            raise ValueError(f"metadata: write key=value, one per line (not '{line.strip()}')")
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip()
    return out

