"""A key's MCP permissions and the pure rules applied to them: no I/O.

    mcp_servers        {server name: [tool-name patterns]}   ("*" matches any run of characters)
      ├─ may_use(server)            the key (and every ancestor) names the server
      ├─ may_call(server, tool)     every layer has a pattern matching the tool
      └─ covers(parent, child)      a sub-key's grant is never wider than its parent's

A request's JSON-RPC method maps to a data-plane scope through ``scopes.MCP_METHOD_SCOPES`` (one table);
``requirement`` resolves its markers from the request's params.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from keyplane.domain import scopes as scope_rules

Grant = Mapping[str, tuple[str, ...]]

MAX_SERVERS_PER_KEY = 64
MAX_PATTERNS_PER_SERVER = 64
# Tool names are 1-128 characters of [A-Za-z0-9_.-] in the MCP spec; patterns add "*" and allow a little more.
_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/:*]{1,128}$")
SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate(grant: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """A normalised copy (sorted, deduplicated), or ValueError naming the bad entry."""
    if len(grant) > MAX_SERVERS_PER_KEY:
        raise ValueError(f"mcp_servers names at most {MAX_SERVERS_PER_KEY} servers")
    out: dict[str, list[str]] = {}
    for server, patterns in grant.items():
        if not isinstance(server, str) or not SERVER_NAME.match(server):
            raise ValueError(f"'{server}' is not an MCP server name (lower-case letters, digits, '-', '_')")
        if isinstance(patterns, str):
            raise ValueError(f"mcp_servers['{server}'] is a list of tool-name patterns")
        listed = sorted(set(patterns))
        if not listed:
            raise ValueError(f"mcp_servers['{server}'] lists no tool pattern: use [\"*\"] for every tool")
        if len(listed) > MAX_PATTERNS_PER_SERVER:
            raise ValueError(f"mcp_servers['{server}'] holds at most {MAX_PATTERNS_PER_SERVER} patterns")
        for pattern in listed:
            if not isinstance(pattern, str) or not _PATTERN.match(pattern):
                raise ValueError(f"'{pattern}' is not a tool-name pattern (letters, digits, '_', '-', '.', "
                                 "'/', ':' and '*', at most 128)")
        out[server] = listed
    return out


def matches(pattern: str, tool: str) -> bool:
    """Glob with ``*`` only (no ``?`` or classes: tool names may contain neither meaningfully)."""
    if "*" not in pattern:
        return pattern == tool
    parts = pattern.split("*")
    if not tool.startswith(parts[0]) or not tool.endswith(parts[-1]):
        return False
    if len(tool) < len(parts[0]) + len(parts[-1]):
        return False
    position = len(parts[0])
    end = len(tool) - len(parts[-1])
    for middle in parts[1:-1]:
        found = tool.find(middle, position, end)
        if found < 0:
            return False
        position = found + len(middle)
    return True


def pattern_within(child: str, parent: str) -> bool:
    """Is every tool name ``child`` matches also matched by ``parent``? Sound, deliberately not complete:
    ``*`` covers all; a literal is covered by any pattern matching it; ``prefix*`` covers any pattern that
    starts with ``prefix``; anything else must be written exactly as the parent wrote it."""
    if parent == "*" or child == parent:
        return True
    if "*" not in child:
        return matches(parent, child)
    if parent.endswith("*") and parent.count("*") == 1:
        return child.startswith(parent[:-1])
    return False


def covers(parent: Grant | Mapping[str, Iterable[str]], child: Mapping[str, Iterable[str]]) -> list[str]:
    """What ``child`` asks for beyond ``parent`` ("server" or "server:pattern"); empty when it is narrower."""
    beyond: list[str] = []
    for server, patterns in child.items():
        held = tuple(parent.get(server, ()))
        if not held:
            beyond.append(server)
            continue
        for pattern in patterns:
            if not any(pattern_within(pattern, p) for p in held):
                beyond.append(f"{server}:{pattern}")
    return beyond


def freeze(grant: Mapping[str, Iterable[str]] | None) -> dict[str, tuple[str, ...]]:
    return {server: tuple(patterns) for server, patterns in (grant or {}).items()}


def may_use(layers: tuple[Grant, ...], server: str) -> bool:
    """``layers``: the key's grant and each ancestor's (a narrowed parent narrows its sub-keys)."""
    return bool(layers) and all(server in layer for layer in layers)


def may_call(layers: tuple[Grant, ...], server: str, tool: str) -> bool:
    return bool(layers) and all(any(matches(p, tool) for p in layer.get(server, ())) for layer in layers)


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one JSON-RPC request needs: a data-plane scope ("" for server access only) and, for tools/call,
    the tool (which must also match the key's patterns)."""

    method: str
    scope: str
    tool: str | None = None
    task: str | None = None  # tasks/get, tasks/result, tasks/cancel: the task acted on (its tool decides)


# Methods whose target the 2026-07-28 protocol mirrors in the Mcp-Name header: method -> params field.
NAME_FIELDS: dict[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class UnknownMethod(Exception):
    pass


def requirement(method: str, params: Any, tool_scopes: Mapping[str, str]) -> Requirement:
    needed = scope_rules.MCP_METHOD_SCOPES.get(method)
    if needed is None:
        raise UnknownMethod(method)
    params = params if isinstance(params, dict) else {}
    if needed == scope_rules.TOOL_SCOPE:
        name = params.get("name")
        tool = name if isinstance(name, str) else ""
        return Requirement(method, tool_scopes.get(tool, scope_rules.DEFAULT_TOOL_SCOPE), tool)
    if needed == scope_rules.REF_SCOPE:
        ref = params.get("ref")
        kind = ref.get("type") if isinstance(ref, dict) else None
        return Requirement(method, "prompts:read" if kind == "ref/prompt" else "contexts:read")
    if needed == scope_rules.LISTEN_SCOPE:
        wanted = params.get("notifications")
        subscribes = isinstance(wanted, dict) and bool(wanted.get("resourceSubscriptions"))
        return Requirement(method, "contexts:read" if subscribes else "")
    if needed == scope_rules.TASK_SCOPE:
        task_id = params.get("taskId")
        return Requirement(method, "", task=task_id if isinstance(task_id, str) else "")
    return Requirement(method, needed)


# List answers and what an entry needs to be shown: the tools a key may call, resources and prompts when the
# key holds their scope (the scope, not a per-entry pattern, decides those).
LIST_FIELDS: dict[str, str] = {
    "tools": scope_rules.TOOL_SCOPE,
    "resources": "contexts:read",
    "resourceTemplates": "contexts:read",
    "prompts": "prompts:read",
}


def filter_result(result: Any, layers: tuple[Grant, ...], held: frozenset[str], server: str,
                  tool_scopes: Mapping[str, str]) -> bool:
    """Drop, in place, the list entries of a JSON-RPC result the key may not use. True when it changed."""
    if not isinstance(result, dict):
        return False
    changed = False
    for field, needed in LIST_FIELDS.items():
        entries = result.get(field)
        if not isinstance(entries, list):
            continue
        if needed == scope_rules.TOOL_SCOPE:
            kept = [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
                    and tool_scopes.get(e["name"], scope_rules.DEFAULT_TOOL_SCOPE) in held
                    and may_call(layers, server, e["name"])]
        else:
            kept = entries if needed in held else []
        if len(kept) != len(entries):
            result[field] = kept
            changed = True
    return changed
