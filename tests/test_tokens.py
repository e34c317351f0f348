"""Key format exactly as DESIGN.md says, checked against an independent computation."""

from __future__ import annotations

import hashlib
import string
import zlib

import pytest

from keyplane.domain import tokens

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase


def independent_checksum(head: str) -> str:
    n = zlib.crc32(head.encode("ascii"))
    out = ""
    for _ in range(6):
        n, r = divmod(n, 62)
        out = ALPHABET[r] + out
    assert n == 0  # 62**6 > 2**32, six digits always suffice
    return out


@pytest.mark.parametrize("prefix", [tokens.VIRTUAL_KEY_PREFIX, tokens.SERVICE_ACCOUNT_PREFIX])
def test_generated_tokens_follow_the_format(prefix: str) -> None:
    seen = set()
    for _ in range(200):
        token = tokens.generate(prefix)
        assert token.startswith(prefix) and len(token) == len(prefix) + 32
        body = token[len(prefix):]
        assert set(body) <= set(ALPHABET)
        assert body[26:] == independent_checksum(token[: len(prefix) + 26])
        assert tokens.is_well_formed(token, prefix)
        seen.add(token)
    assert len(seen) == 200


def test_known_checksum_value() -> None:
    head = "mcp_sk_" + "A" * 26
    assert tokens.checksum(head) == independent_checksum(head)
    assert len(tokens.checksum("mcp_sk_")) == 6  # left-padded with zeros


def test_malformed_and_mistyped_tokens_are_refused() -> None:
    good = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    flipped = good[:10] + ("a" if good[10] != "a" else "b") + good[11:]
    assert not tokens.is_well_formed(flipped, tokens.VIRTUAL_KEY_PREFIX)
    assert not tokens.is_well_formed(good[:-1], tokens.VIRTUAL_KEY_PREFIX)
    assert not tokens.is_well_formed(good + "x", tokens.VIRTUAL_KEY_PREFIX)
    assert not tokens.is_well_formed(good.replace("mcp_sk_", "mcp_sa_"), tokens.VIRTUAL_KEY_PREFIX)
    assert not tokens.is_well_formed(good[:-7] + "-" + good[-6:], tokens.VIRTUAL_KEY_PREFIX)
    assert not tokens.is_well_formed("", tokens.VIRTUAL_KEY_PREFIX)


def test_only_the_hash_and_a_mask_identify_a_token() -> None:
    token = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    assert tokens.hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    masked = tokens.mask(token)
    assert masked == f"mcp_sk_{token[7:11]}…{token[-4:]}"
    assert token not in masked
