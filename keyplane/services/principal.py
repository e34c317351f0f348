"""Who is acting: every service call takes one, and every audit event names it."""

from __future__ import annotations

import contextvars
import getpass
import secrets
from dataclasses import dataclass, field
from typing import Any

from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import insufficient_scope
from keyplane.domain.tokens import BASE62


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(20))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The MCP tool a principal is acting through: the audit names the tool and its (redacted) arguments."""

    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)


class CallMark:
    """Set around one MCP tool call: ``audit.append`` marks it when the call's change recorded the call."""

    __slots__ = ("recorded",)

    def __init__(self) -> None:
        self.recorded = False


current_call: contextvars.ContextVar[CallMark | None] = contextvars.ContextVar("keyplane_tool_call", default=None)


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: str
    id: str  # service-account id, "cli:<user>" or "system"
    name: str
    scopes: frozenset[str]
    via: ToolCall | None = None

    def require(self, scope: str) -> None:
        if scope and not scope_rules.holds(self.scopes, scope):
            raise insufficient_scope(scope)

    @property
    def label(self) -> str:
        return self.id


def system(org_id: str) -> Principal:
    return Principal(org_id=org_id, id="system", name="system", scopes=frozenset({scope_rules.ADMIN}))


def cli(org_id: str) -> Principal:
    """The CLI acts with local access to the store, which is full access; the audit names the OS user."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Principal(org_id=org_id, id=f"cli:{user}", name=f"cli:{user}", scopes=frozenset({scope_rules.ADMIN}))
