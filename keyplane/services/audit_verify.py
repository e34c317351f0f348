"""Verifying the audit chain in constant memory, and writing signed checkpoints of its head.

``ChainVerifier`` streams one organization's entries in pages (keyset pagination on ``seq``, each page
its own short read, hashed in a worker thread), starting from the newest signed checkpoint
(incremental) or from genesis (``full``). Checkpoints from the directory are checked on the way:
their signatures, the hashes they pinned, and that the chain still reaches the furthest of them
(truncation).

``Checkpointer`` runs in every server process: each interval (and on shutdown) it verifies each
organization's new entries from the last checkpoint, then signs the head and writes it to the
checkpoint directory (and optionally POSTs it to a webhook). It never signs a chain that does not
verify. See docs/operations.md "Audit checkpoints".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from keyplane.domain import audit_chain
from keyplane.domain.audit_chain import PROBLEMS, ChainVerdict, ChainWalker
from keyplane.domain.audit_checkpoint import BadCheckpoint, Checkpoint, open_signed, public_key_text, sign
from keyplane.domain.errors import not_found
from keyplane.store.checkpoints import CheckpointDirectory
from keyplane.store.db import Database
from keyplane.store.models import AuditEvent, Organization

log = logging.getLogger("keyplane.audit")

PAGE_SIZE = 5000
_ENTRIES = AuditEvent.__table__
# Core columns, run on the session's connection: no ORM row processing (half the cost of a page).
_COLUMNS = tuple(_ENTRIES.c[name] for name in ("seq", "time", "principal", "action", "target", "details",
                                                 "prev_hash", "hash", "hash_version"))


def _refused(problem: str, detail: str, *, seq: int | None, full: bool, checkpoints: int = 0,
             from_seq: int = 0, verified_up_to: int = 0) -> ChainVerdict:
    return ChainVerdict(False, 0, verified_up_to, seq, f"{PROBLEMS[problem]} ({detail})", problem, full=full,
                        from_seq=from_seq, checkpoints=checkpoints)


class ChainVerifier:
    def __init__(self, db: Database, chain_key: Callable[[], bytes], public_key: Callable[[], Ed25519PublicKey],
                 *, page_size: int = PAGE_SIZE) -> None:
        self.db = db
        self.chain_key = chain_key
        self.public_key = public_key
        self.page_size = page_size

    async def verify_org(self, org_id: str, *, checkpoint_dir: Path | None, full: bool = False) -> ChainVerdict:
        async with self.db.read() as s:
            head = (await s.execute(select(Organization.audit_seq, Organization.audit_head,
                                           Organization.audit_legacy_seq)
                                    .where(Organization.id == org_id))).one_or_none()
        if head is None:
            raise not_found("organization", org_id)
        head_seq, head_hash, db_legacy_seq = head
        directory = CheckpointDirectory(checkpoint_dir) if checkpoint_dir is not None else None
        loaded = await asyncio.to_thread(self._load_checkpoints, directory, org_id, full)
        if isinstance(loaded, ChainVerdict):
            return replace(loaded, full=full)
        checkpoints = loaded
        count = len(checkpoints)

        legacy = {c.legacy_seq for c in checkpoints}
        if len(legacy) > 1:
            return _refused("legacy_moved", f"checkpoints disagree: {sorted(legacy)}", seq=min(legacy) + 1,
                            full=full, checkpoints=count)
        legacy_seq = legacy.pop() if legacy else db_legacy_seq
        if legacy_seq != db_legacy_seq:
            return _refused("legacy_moved", f"the store says {db_legacy_seq}, signed checkpoints say {legacy_seq}",
                            seq=min(legacy_seq, db_legacy_seq) + 1, full=full, checkpoints=count)

        newest = max(checkpoints, key=lambda c: c.seq, default=None)
        start: Checkpoint | None = None
        if not full and newest is not None:
            if newest.seq > head_seq:
                return _refused("truncated", f"a checkpoint signed at {newest.time} says entry {newest.seq} existed;"
                                f" the stored head is entry {head_seq}", seq=head_seq + 1, full=full,
                                checkpoints=count)
            start = newest
            async with self.db.read() as s:
                at = (await s.execute(select(AuditEvent.hash).where(AuditEvent.org_id == org_id,
                                                                    AuditEvent.seq == start.seq))).scalar_one_or_none()
            if at is None:
                return _refused("missing", f"checkpointed entry {start.seq} is not there", seq=start.seq, full=full,
                                checkpoints=count)
            if at != start.hash:
                return _refused("checkpoint_mismatch", f"a checkpoint signed at {start.time} recorded another hash"
                                f" for entry {start.seq}", seq=start.seq, full=full, checkpoints=count)

        walker = ChainWalker(org_id, self.chain_key(),
                             start_seq=start.seq if start else 0,
                             start_hash=start.hash if start else audit_chain.GENESIS_HASH,
                             legacy_seq=legacy_seq,
                             pins={c.seq: c.hash for c in checkpoints} if full else {})
        while walker.failure is None and walker.last < head_seq:
            rows = await self.db.run_read(lambda session: self._page(session, org_id, walker.last, head_seq))
            if not rows:
                break  # no entries where the head says there are: finish() names the truncation
            # Hashing a page is CPU work: off the event loop, so the data plane keeps being served.
            await asyncio.to_thread(walker.feed, rows)  # type: ignore[arg-type]  # Row unpacks as StoredRow
        verdict = walker.finish(head_seq, head_hash, checkpoints=count,
                                newest_checkpoint=(newest.seq, newest.hash, newest.time) if newest else None)
        return replace(verdict, full=full)

    def _page(self, session: Session, org_id: str, after: int, head_seq: int) -> list[Any]:
        return list(session.connection().execute(
            select(*_COLUMNS)
            .where(_ENTRIES.c.org_id == org_id, _ENTRIES.c.seq > after, _ENTRIES.c.seq <= head_seq)
            .order_by(_ENTRIES.c.seq)
            .limit(self.page_size)
        ).all())

    def _load_checkpoints(self, directory: CheckpointDirectory | None, org_id: str,
                          every: bool) -> list[Checkpoint] | ChainVerdict:
        """The signed checkpoints to hold the chain to: every one (full), or the newest only."""
        if directory is None:
            return []
        if every:
            found = [(seq, lambda seq=seq: directory.read(org_id, seq)) for seq in directory.seqs(org_id)]
        else:
            seqs = directory.seqs(org_id)
            found = [(seqs[-1], lambda: directory.read(org_id, seqs[-1]))] if seqs else []
        key = self.public_key()
        out = []
        for seq, read in found:
            try:
                cp = open_signed(read(), key)
                if cp.org != org_id or cp.seq != seq:
                    raise BadCheckpoint(f"it states organization {cp.org} entry {cp.seq}")
            except (BadCheckpoint, ValueError, OSError) as exc:
                reason = str(exc) if isinstance(exc, BadCheckpoint) else "unreadable"
                return _refused("bad_checkpoint", f"{directory.file_for(org_id, seq)}: {reason}", seq=seq,
                                full=every, checkpoints=len(out))
            out.append(cp)
        return out


class Checkpointer:
    def __init__(self, db: Database, verifier: ChainVerifier, directory: Path,
                 signing_key: Callable[[], Ed25519PrivateKey], webhook_url: str | None = None) -> None:
        self.db = db
        self.verifier = verifier
        self.directory = CheckpointDirectory(directory)
        self.signing_key = signing_key
        self.webhook_url = webhook_url
        self._done: dict[str, int] = {}  # org id -> newest head checkpointed (by anyone) that this process knows
        self._undelivered: dict[str, dict[str, Any]] = {}  # org id -> newest checkpoint the webhook has not taken
        self._complained: set[tuple[str, int]] = set()

    async def run_once(self) -> list[dict[str, Any]]:
        """Checkpoint every organization whose head moved; the documents this process wrote."""
        async with self.db.read() as s:
            heads = (await s.execute(select(Organization.id, Organization.audit_seq))).all()
        written = []
        for org_id, seq in heads:
            if seq == 0 or self._done.get(org_id) == seq:
                continue
            if await asyncio.to_thread(self.directory.has, org_id, seq):
                self._done[org_id] = seq
                continue
            document = await self.checkpoint(org_id)
            if document is not None:
                written.append(document)
        await self._deliver()
        return written

    async def checkpoint(self, org_id: str) -> dict[str, Any] | None:
        verdict = await self.verifier.verify_org(org_id, checkpoint_dir=self.directory.path)
        if not verdict.ok:
            if (org_id, verdict.first_broken_seq or 0) not in self._complained:
                self._complained.add((org_id, verdict.first_broken_seq or 0))
                log.error("audit chain of organization %s does not verify, not checkpointing it: entry %s: %s",
                          org_id, verdict.first_broken_seq, verdict.reason)
            return None
        async with self.db.read() as s:
            legacy_seq = (await s.execute(select(Organization.audit_legacy_seq)
                                          .where(Organization.id == org_id))).scalar_one()
        key = self.signing_key()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        document = sign(Checkpoint(org_id, verdict.head_seq, verdict.head_hash, now, legacy_seq), key)
        wrote = await asyncio.to_thread(self._write, document, public_key_text(key.public_key()))
        self._done[org_id] = verdict.head_seq
        if not wrote:
            return None
        if self.webhook_url:
            self._undelivered[org_id] = document
        return document

    def _write(self, document: dict[str, Any], public_key: str) -> bool:
        self.directory.write_public_key(public_key)
        if self.directory.write(document):
            return True
        theirs = self.directory.read(document["org"], document["seq"])
        if theirs.get("hash") != document["hash"]:
            log.error("checkpoint %s says hash %s for this head, the chain says %s",
                      self.directory.file_for(document["org"], document["seq"]), theirs.get("hash"), document["hash"])
        return False

    async def _deliver(self) -> None:
        if not self._undelivered or not self.webhook_url:
            return
        import httpx

        async with httpx.AsyncClient(timeout=5.0) as client:
            for org_id, document in list(self._undelivered.items()):
                try:
                    resp = await client.post(self.webhook_url, content=json.dumps(document),
                                             headers={"Content-Type": "application/json"})
                except httpx.HTTPError as exc:
                    log.warning("audit checkpoint webhook unreachable: %s; will retry", type(exc).__name__)
                    return
                if resp.status_code >= 300:
                    log.warning("audit checkpoint webhook answered %d; will retry", resp.status_code)
                    return
                if self._undelivered.get(org_id) is document:
                    del self._undelivered[org_id]
