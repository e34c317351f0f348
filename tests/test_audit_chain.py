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


# -- the keyed rule (hash_version 2) and the page-at-a-time walker ----------------------------------------

KEY = bytes(range(32))


def keyed(n: int, org: str = "org_a") -> list[ChainEntry]:
    out, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        fields = (seq, f"2026-01-01T00:00:{seq:02d}.000000Z", "sa_x", "virtual_key.update", f"key_{seq}",
                  {"name": f"k{seq}", "quote": 'a "b" \\ c\n\t\u0001 ü €', "n": [1, 2.5, None, True]})
        digest = audit_chain.keyed_chain_hash(KEY, org, prev, entry_payload(*fields))
        out.append(ChainEntry(*fields, prev_hash=prev, hash=digest, hash_version=audit_chain.KEYED_HMAC))
        prev = digest
    return out


def test_canonical_entry_is_canonical_json_of_the_payload() -> None:
    for e in keyed(3):
        stored = audit_chain.stored_row(e)
        assert audit_chain.canonical_entry(*stored[:6]) == audit_chain.canonical_json(
            entry_payload(e.seq, e.time, e.principal, e.action, e.target, e.details))


def test_keyed_hash_needs_the_key_and_binds_the_organization() -> None:
    chain = keyed(4)
    assert audit_chain.verify(chain, 4, chain[-1].hash, org_id="org_a", key=KEY, legacy_seq=0).ok
    wrong_key = audit_chain.verify(chain, 4, chain[-1].hash, org_id="org_a", key=bytes(32), legacy_seq=0)
    assert wrong_key.problem == "edited" and wrong_key.first_broken_seq == 1
    other_org = audit_chain.verify(chain, 4, chain[-1].hash, org_id="org_b", key=KEY, legacy_seq=0)
    assert other_org.problem == "edited" and other_org.first_broken_seq == 1


def test_a_plain_sha256_rewrite_is_named_unkeyed_and_legacy_entries_end_at_the_boundary() -> None:
    chain = keyed(4)
    fields = (3, chain[2].time, "sa_x", "virtual_key.update", "key_3", {"name": "innocent"})
    forged = chain_hash(chain[1].hash, entry_payload(*fields))
    chain[2] = ChainEntry(*fields, prev_hash=chain[1].hash, hash=forged, hash_version=audit_chain.KEYED_HMAC)
    verdict = audit_chain.verify(chain[:3], 3, forged, org_id="org_a", key=KEY, legacy_seq=0)
    assert verdict.problem == "unkeyed" and verdict.first_broken_seq == 3 and verdict.verified_up_to == 2
    downgraded = dataclasses.replace(chain[2], hash_version=audit_chain.LEGACY_SHA256)
    verdict = audit_chain.verify([*chain[:2], downgraded], 3, forged, org_id="org_a", key=KEY, legacy_seq=0)
    assert verdict.problem == "downgraded" and verdict.first_broken_seq == 3
    assert audit_chain.verify([*chain[:2], downgraded], 3, forged, org_id="org_a", key=KEY, legacy_seq=3).ok is False


def test_fed_in_pages_or_at_once_the_walker_says_the_same() -> None:
    rows = [audit_chain.stored_row(e) for e in keyed(10)]
    whole = audit_chain.ChainWalker("org_a", KEY)
    whole.feed(rows)
    paged = audit_chain.ChainWalker("org_a", KEY)
    for i in range(0, 10, 3):
        assert paged.feed(rows[i:i + 3])
    assert whole.finish(10, rows[-1][7]) == paged.finish(10, rows[-1][7])
    # Started after a known-good entry, it checks only what follows.
    tail = audit_chain.ChainWalker("org_a", KEY, start_seq=6, start_hash=rows[5][7])
    tail.feed(rows[6:])
    verdict = tail.finish(10, rows[-1][7])
    assert verdict.ok and verdict.checked == 4 and verdict.entries == 10 and verdict.from_seq == 6
    # A pinned hash that differs is named where it was pinned.
    pinned = audit_chain.ChainWalker("org_a", KEY, pins={5: "0" * 64})
    assert not pinned.feed(rows) and pinned.failure is not None
    assert pinned.failure.problem == "checkpoint_mismatch" and pinned.failure.first_broken_seq == 5
