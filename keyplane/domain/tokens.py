"""Key format (DESIGN.md "Key format").

``<prefix>`` + 26 random base62 characters + 6 base62 characters of CRC32(prefix + random).
The checksum lets a mistyped or forged key be refused without a store lookup.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
RANDOM_LEN = 26
CHECKSUM_LEN = 6
BODY_LEN = RANDOM_LEN + CHECKSUM_LEN

VIRTUAL_KEY_PREFIX = "mcp_sk_"
SERVICE_ACCOUNT_PREFIX = "mcp_sa_"
PREFIXES = (VIRTUAL_KEY_PREFIX, SERVICE_ACCOUNT_PREFIX)


def base62_encode(value: int, width: int) -> str:
    digits = []
    while value:
        value, rem = divmod(value, 62)
        digits.append(BASE62[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(head: str) -> str:
    """Six base62 digits of CRC32 over the ASCII bytes of prefix + random part."""
    return base62_encode(zlib.crc32(head.encode("ascii")), CHECKSUM_LEN)


def generate(prefix: str) -> str:
    if prefix not in PREFIXES:
        raise ValueError(f"unknown token prefix {prefix!r}")
    head = prefix + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LEN))
    return head + checksum(head)


def is_well_formed(token: str, prefix: str) -> bool:
    """Shape and checksum only: no store lookup. Constant work for every input length we accept."""
    if len(token) != len(prefix) + BODY_LEN or not token.startswith(prefix):
        return False
    body = token[len(prefix) :]
    if not _BASE62_SET.issuperset(body):
        return False
    head = token[: len(prefix) + RANDOM_LEN]
    return secrets.compare_digest(checksum(head), token[-CHECKSUM_LEN:])


def hash_token(token: str) -> str:
    """Only this digest is ever stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mask(token: str) -> str:
    """A display form that identifies a key without revealing it: ``mcp_sk_Ab3x…9fQz``."""
    prefix = next((p for p in PREFIXES if token.startswith(p)), "")
    body = token[len(prefix) :]
    return f"{prefix}{body[:4]}…{body[-4:]}"
