"""A key's traffic: which usage events belong to a key, and what each one's outcome was.

One definition, used by every reader of usage (the summary in the REST API, CLI, MCP tool and
dashboard; recommendations; alert rules):

    a key's traffic = the key's own requests
                      + its sub-keys' requests, at any depth   (when include_sub_keys, the default)

Sub-keys are included by default because their requests count against every ancestor's limits:
a parent's usage, alerts and recommended limits must see them. ``include_sub_keys=False`` asks for
the key's own requests only.

Every request has one of three outcomes (served, refused, failed: ``keyplane.domain.outcomes``, the
rule the usage rollups count by too), and "requests" always means all three.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, case, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain.outcomes import REFUSED_STATUSES, outcome
from keyplane.services.keys import MAX_SUBKEY_DEPTH
from keyplane.store.models import UsageEvent, VirtualKey

__all__ = ["INCLUDE_SUB_KEYS", "REFUSED_STATUSES", "belongs_to", "key_ids", "outcome", "refused_column"]

INCLUDE_SUB_KEYS = True
"""The one default for every surface: a key's traffic includes its sub-keys'."""



def refused_column() -> ColumnElement[Any]:
    """1 for a refused event, 0 otherwise: the same rule as ``outcome``, for aggregate queries."""
    return case((UsageEvent.status.in_(REFUSED_STATUSES), 1), else_=0)


async def key_ids(s: AsyncSession, org_id: str | None, key_id: str,
                  include_sub_keys: bool = INCLUDE_SUB_KEYS) -> list[str]:
    """The ids whose usage events make up ``key_id``'s traffic: the key, and its descendants if asked.

    Deleted sub-keys are included (their usage stays in reports). The walk is one query per level,
    bounded by the deepest nesting keyplane allows. ``org_id`` confines it to one organization (None
    only where the key was already resolved, such as a budget bucket).
    """
    ids = [key_id]
    if not include_sub_keys:
        return ids
    level = [key_id]
    for _ in range(MAX_SUBKEY_DEPTH):
        level = list((await s.execute(_children(org_id, level))).scalars())
        if not level:
            break
        ids.extend(level)
    return ids


def _children(org_id: str | None, level: list[str]) -> Select[tuple[str]]:
    q = select(VirtualKey.id).where(VirtualKey.parent_id.in_(level))
    return q if org_id is None else q.where(VirtualKey.org_id == org_id)


def belongs_to(ids: list[str]) -> ColumnElement[bool]:
    """The usage-event filter for a key's traffic (ids from ``key_ids``)."""
    return UsageEvent.key_id.in_(ids) if len(ids) > 1 else UsageEvent.key_id == ids[0]

