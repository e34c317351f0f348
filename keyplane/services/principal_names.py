"""Who an audit entry's principal id is, by name: ``sa_jkxmm…`` reads as "admin" in the dashboard.

Names of the reader's own organization only; a name is no secret, and ids that are not service accounts
(``cli:alice``, ``system``) are already readable.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select

from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import ServiceAccount


class PrincipalNames:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def of(self, reader: Principal, ids: Iterable[str]) -> dict[str, str]:
        """``{id: name}`` for the service accounts among ``ids`` in the reader's organization."""
        wanted = sorted({i for i in ids if i and i.startswith("sa_")})
        if not wanted:
            return {}
        query = select(ServiceAccount.id, ServiceAccount.name).where(
            ServiceAccount.org_id == reader.org_id, ServiceAccount.id.in_(wanted))
        async with self.db.read() as s:
            return {row.id: row.name for row in await s.execute(query)}
