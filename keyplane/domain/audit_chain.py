"""The audit hash chain (DESIGN.md "Audit chain"): pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


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


def chain_hash(prev_hash: str, payload: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical_json(payload)).encode("utf-8")).hexdigest()


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


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    entries: int
    verified_up_to: int
    first_broken_seq: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "verified_up_to": self.verified_up_to,
            "first_broken_seq": self.first_broken_seq,
            "reason": self.reason,
        }


def verify(entries: Iterable[ChainEntry], head_seq: int | None = None, head_hash: str | None = None) -> ChainVerdict:
    """Recompute the chain in ``seq`` order and name the first entry that does not fit.

    ``head_seq``/``head_hash`` are the chain head the store keeps beside the entries, so that
    deleting the newest entries is caught too.
    """
    prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            return ChainVerdict(False, count, expected_seq - 1, expected_seq, "entry missing or out of order")
        if entry.prev_hash != prev:
            return ChainVerdict(False, count, expected_seq - 1, entry.seq, "prev_hash does not match the entry before")
        payload = entry_payload(entry.seq, entry.time, entry.principal, entry.action, entry.target, entry.details)
        if chain_hash(prev, payload) != entry.hash:
            return ChainVerdict(False, count, expected_seq - 1, entry.seq, "entry content does not match its hash")
        prev = entry.hash
        expected_seq += 1
    last = expected_seq - 1
    if head_seq is not None and head_seq != last:
        return ChainVerdict(False, count, last, last + 1, "entries after this one were deleted")
    if head_hash is not None and last > 0 and head_hash != prev:
        return ChainVerdict(False, count, last - 1, last, "last entry does not match the chain head")
    return ChainVerdict(True, count, last)
