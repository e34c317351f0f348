"""The audit hash chain (DESIGN.md "Audit chain"): pure functions, no I/O.

Two hash rules, marked on every entry by ``hash_version``:

- version 1 (legacy, entries written before migration 0004):
  ``sha256(prev_hash + canonical_json(entry))``. Anyone who can write the database can recompute it.
- version 2 (every entry since): ``HMAC-SHA256(chain_key, org_id + "\\n" + prev_hash +
  canonical_json(entry))``, the chain key derived from the master key (``audit_keys``), which is
  never stored in the database. Whoever writes the database without the key cannot produce a hash
  that verifies; the organization id in the message stops a chain being copied to another tenant.

Version-1 entries verify only up to the organization's legacy boundary (its head at migration time,
pinned by the signed checkpoints), and never after a version-2 entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # the C encoder json.dumps uses
from typing import Any

GENESIS_HASH = "0" * 64
LEGACY_SHA256 = 1
KEYED_HMAC = 2
CURRENT_VERSION = KEYED_HMAC


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 (not ASCII-escaped): the exact bytes that are hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_payload(
    seq: int, time: str, principal: str, action: str, target: str, details: dict[str, Any]
) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": time,
        "principal": principal,
        "action": action,
        "target": target,
        "details": details,
    }


def canonical_entry(seq: int, time: str, principal: str, action: str, target: str, details_json: str) -> str:
    """``canonical_json(entry_payload(...))`` built from the stored canonical details text, without
    parsing it: the verifier's fast path (a test holds the two equal)."""
    return (f'{{"action":{encode_basestring(action)},"details":{details_json},'
            f'"principal":{encode_basestring(principal)},"seq":{seq},'
            f'"target":{encode_basestring(target)},"time":{encode_basestring(time)}}}')


def chain_hash(prev_hash: str, payload: dict[str, Any]) -> str:
    """The legacy (version 1) rule: plain SHA-256, recomputable by anyone."""
    return _plain(prev_hash, canonical_json(payload))


def keyed_chain_hash(key: bytes, org_id: str, prev_hash: str, payload: dict[str, Any]) -> str:
    """The version 2 rule: HMAC-SHA256 under the chain key."""
    return _keyed(key, org_id, prev_hash, canonical_json(payload))


def _plain(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _keyed(key: bytes, org_id: str, prev_hash: str, canonical: str) -> str:
    return hmac.digest(key, f"{org_id}\n{prev_hash}{canonical}".encode(), "sha256").hex()


@dataclass(frozen=True)
class ChainEntry:
    seq: int
    time: str
    principal: str
    action: str
    target: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
    hash_version: int = LEGACY_SHA256


# What went wrong, by kind (``ChainVerdict.problem``):
PROBLEMS = {
    "missing": "an entry was deleted or entries were reordered",
    "broken_link": "an entry's prev_hash does not match the entry before it",
    "edited": "an entry's content does not match its hash",
    "unkeyed": "an entry's hash is a plain SHA-256, not keyed with the chain key: rewritten or forged "
               "by someone without the key",
    "downgraded": "a legacy (unkeyed) entry after the legacy boundary: forged",
    "unknown_version": "an entry names a hash rule keyplane does not know",
    "checkpoint_mismatch": "an entry differs from what a signed checkpoint recorded: history was replaced",
    "truncated": "the chain ends before a point it is known to have reached: entries were deleted",
    "head_mismatch": "the last entry does not match the stored chain head",
    "bad_checkpoint": "a checkpoint is not signed by this keyplane's checkpoint key",
    "legacy_moved": "the legacy boundary differs from the one the signed checkpoints recorded",
}


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    entries: int  # entries of the chain accounted for: those a starting checkpoint covers, and those checked
    verified_up_to: int
    first_broken_seq: int | None = None
    reason: str | None = None
    problem: str | None = None
    # How the run went: from genesis (full) or from the newest signed checkpoint at ``from_seq``.
    full: bool = True
    from_seq: int = 0
    checkpoints: int = 0
    checked: int = 0  # entries hashed in this run
    head_seq: int = 0
    head_hash: str = GENESIS_HASH

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "verified_up_to": self.verified_up_to,
            "first_broken_seq": self.first_broken_seq,
            "problem": self.problem,
            "reason": self.reason,
            "full": self.full,
            "from_seq": self.from_seq,
            "checkpoints": self.checkpoints,
            "checked": self.checked,
        }


StoredRow = tuple[int, str, str, str, str, str, str, str, int]
"""One stored entry as the verifier reads it: seq, time, principal, action, target, details (canonical
JSON text), prev_hash, hash, hash_version."""


@dataclass
class ChainWalker:
    """Verifies a chain fed in ``seq`` order, one page at a time, in constant memory.

    Starts at genesis, or after an entry already known good (``start_seq``/``start_hash``, from a
    signed checkpoint). ``pins`` are seq -> hash statements from signed checkpoints that the entries
    met on the way must match.
    """

    org_id: str
    key: bytes | None
    start_seq: int = 0
    start_hash: str = GENESIS_HASH
    legacy_seq: int = 0
    pins: Mapping[int, str] = field(default_factory=dict)
    count: int = 0
    failure: ChainVerdict | None = None
    keyed_seen: bool = False

    def __post_init__(self) -> None:
        self.prev = self.start_hash
        self.last = self.start_seq
        # Started after the legacy boundary: everything from here on is keyed.
        self.keyed_seen = self.keyed_seen or self.start_seq > self.legacy_seq

    def _fail(self, seq: int, problem: str, detail: str = "") -> ChainVerdict:
        reason = PROBLEMS[problem] + (f" ({detail})" if detail else "")
        self.failure = ChainVerdict(False, self.start_seq + self.count, self.last, seq, reason, problem,
                                    full=self.start_seq == 0, from_seq=self.start_seq, checked=self.count)
        return self.failure

    def feed(self, rows: Iterable[StoredRow]) -> bool:
        """Check the next entries; False (and ``failure`` set) at the first that does not fit."""
        if self.failure is not None:
            return False
        for seq, time, principal, action, target, details, prev_hash, digest, version in rows:
            self.count += 1
            if seq != self.last + 1:
                self._fail(self.last + 1, "missing", f"entry {self.last + 1} is not there")
                return False
            if prev_hash != self.prev:
                self._fail(seq, "broken_link")
                return False
            canonical = canonical_entry(seq, time, principal, action, target, details)
            if version == KEYED_HMAC:
                if self.key is None:
                    raise ValueError("verifying keyed entries needs the chain key")
                if _keyed(self.key, self.org_id, prev_hash, canonical) != digest and not self._slow_match(
                        seq, time, principal, action, target, details, prev_hash, digest, version):
                    self._fail(seq, "unkeyed" if self._plain_match(canonical, prev_hash, digest, details, seq, time,
                                                                     principal, action, target) else "edited")
                    return False
                self.keyed_seen = True
            elif version == LEGACY_SHA256:
                if seq > self.legacy_seq or self.keyed_seen:
                    self._fail(seq, "downgraded", f"legacy entries end at {self.legacy_seq}")
                    return False
                if _plain(prev_hash, canonical) != digest and not self._slow_match(
                        seq, time, principal, action, target, details, prev_hash, digest, version):
                    self._fail(seq, "edited")
                    return False
            else:
                self._fail(seq, "unknown_version", f"hash_version {version}")
                return False
            pinned = self.pins.get(seq)
            if pinned is not None and pinned != digest:
                self._fail(seq, "checkpoint_mismatch", f"a checkpoint signed hash {pinned[:12]}… for entry {seq}")
                return False
            self.prev = digest
            self.last = seq
        return True

    def _slow_match(self, seq: int, time: str, principal: str, action: str, target: str, details: str,
                    prev_hash: str, digest: str, version: int) -> bool:
        """The exact rule (details parsed and re-serialized), for stored text that is not canonical."""
        try:
            payload = entry_payload(seq, time, principal, action, target, json.loads(details))
        except ValueError:
            return False
        if version == KEYED_HMAC:
            assert self.key is not None
            return keyed_chain_hash(self.key, self.org_id, prev_hash, payload) == digest
        return chain_hash(prev_hash, payload) == digest

    @staticmethod
    def _plain_match(canonical: str, prev_hash: str, digest: str, details: str, seq: int, time: str,
                     principal: str, action: str, target: str) -> bool:
        if _plain(prev_hash, canonical) == digest:
            return True
        try:
            return chain_hash(prev_hash, entry_payload(seq, time, principal, action, target,
                                                       json.loads(details))) == digest
        except ValueError:
            return False

    def finish(self, head_seq: int | None, head_hash: str | None, *, checkpoints: int = 0,
               newest_checkpoint: tuple[int, str, str] | None = None) -> ChainVerdict:
        """The verdict once every entry up to the stored head was fed.

        ``newest_checkpoint`` (seq, hash, time) is the furthest point the chain is known to have
        reached: a chain ending before it was truncated, even if its stored head was rolled back too.
        """
        full = self.start_seq == 0
        if self.failure is not None:
            return _with(self.failure, checkpoints=checkpoints)
        last, n = self.last, self.start_seq + self.count
        if newest_checkpoint is not None and newest_checkpoint[0] > last:
            seq, _, time = newest_checkpoint
            return ChainVerdict(False, n, last, last + 1,
                                PROBLEMS["truncated"] + f" (a checkpoint signed at {time} says entry {seq} existed;"
                                f" the chain now ends at {last})", "truncated", full, self.start_seq, checkpoints,
                                self.count)
        if head_seq is not None and head_seq != last:
            return ChainVerdict(False, n, last, last + 1,
                                PROBLEMS["truncated"] + f" (the stored head is entry {head_seq})", "truncated",
                                full, self.start_seq, checkpoints, self.count)
        if head_hash is not None and last > 0 and head_hash != self.prev:
            return ChainVerdict(False, n, last - 1, last, PROBLEMS["head_mismatch"], "head_mismatch",
                                full, self.start_seq, checkpoints, self.count)
        return ChainVerdict(True, n, last, full=full, from_seq=self.start_seq, checkpoints=checkpoints,
                            checked=self.count, head_seq=last, head_hash=self.prev)


def _with(verdict: ChainVerdict, **changes: Any) -> ChainVerdict:
    from dataclasses import replace

    return replace(verdict, **changes)


def stored_row(entry: ChainEntry) -> StoredRow:
    return (entry.seq, entry.time, entry.principal, entry.action, entry.target, canonical_json(entry.details),
            entry.prev_hash, entry.hash, entry.hash_version)


def verify(entries: Iterable[ChainEntry], head_seq: int | None = None, head_hash: str | None = None, *,
           org_id: str = "", key: bytes | None = None, legacy_seq: int | None = None) -> ChainVerdict:
    """Recompute a whole chain in ``seq`` order and name the first entry that does not fit.

    ``head_seq``/``head_hash`` are the chain head the store keeps beside the entries, so that
    deleting the newest entries is caught too. Without ``legacy_seq`` every legacy entry counts as
    before the boundary (the pure legacy chain of old tests and tools).
    """
    walker = ChainWalker(org_id, key, legacy_seq=legacy_seq if legacy_seq is not None else 2**62)
    walker.feed(stored_row(e) for e in entries)
    return walker.finish(head_seq, head_hash)
