"""The chain math: any edit, deletion or reordering is named at the first broken entry."""

from __future__ import annotations

import dataclasses

from keyplane.domain import audit_chain
from keyplane.domain.audit_chain import GENESIS_HASH, ChainEntry, chain_hash, entry_payload


def build(n: int) -> list[ChainEntry]:
    out, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        fields = (seq, f"2026-01-01T00:00:0{seq % 10}.000000Z", "sa_x", "virtual_key.create", f"key_{seq}",
                  {"name": f"k{seq}", "ünï": "cödé"})
        digest = chain_hash(prev, entry_payload(*fields))
        out.append(ChainEntry(*fields, prev_hash=prev, hash=digest))
        prev = digest
    return out


def test_hash_is_sha256_of_prev_plus_canonical_json() -> None:
    import hashlib
    import json

    payload = entry_payload(1, "t", "p", "a", "x", {"b": 1, "a": "é"})
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical == audit_chain.canonical_json(payload)
    assert '"a":"é"' in canonical
    expected = hashlib.sha256((GENESIS_HASH + canonical).encode("utf-8")).hexdigest()
    assert chain_hash(GENESIS_HASH, payload) == expected


def test_intact_chain_verifies() -> None:
    chain = build(5)
    verdict = audit_chain.verify(chain, head_seq=5, head_hash=chain[-1].hash)
    assert verdict.ok and verdict.entries == 5 and verdict.verified_up_to == 5


def test_edited_entry_is_named() -> None:
    chain = build(5)
    chain[2] = dataclasses.replace(chain[2], details={"name": "changed"})
    verdict = audit_chain.verify(chain, head_seq=5, head_hash=chain[-1].hash)
    assert not verdict.ok and verdict.first_broken_seq == 3 and verdict.verified_up_to == 2


def test_deleted_entry_is_named() -> None:
    chain = build(5)
    del chain[1]
    verdict = audit_chain.verify(chain, head_seq=5, head_hash=chain[-1].hash)
    assert not verdict.ok and verdict.first_broken_seq == 2


def test_reordered_entries_are_named() -> None:
    chain = build(5)
    a, b = chain[1], chain[2]
    chain[1] = dataclasses.replace(b, seq=2)
    chain[2] = dataclasses.replace(a, seq=3)
    verdict = audit_chain.verify(chain, head_seq=5, head_hash=build(5)[-1].hash)
    assert not verdict.ok and verdict.first_broken_seq == 2


def test_truncated_tail_is_caught_by_the_head() -> None:
    chain = build(5)
    verdict = audit_chain.verify(chain[:4], head_seq=5, head_hash=chain[-1].hash)
    assert not verdict.ok and verdict.first_broken_seq == 5
