"""Signed checkpoints of the audit chain, and the two keys the chain uses: pure, no I/O.

Both keys are derived from the master key with HKDF-SHA256 (distinct ``info`` labels), so:

- every process of one deployment (they share the master key) hashes and signs alike, with no
  second secret to distribute;
- neither key is in the database: whoever can write the database but does not hold the master key
  can neither recompute a chain hash nor sign a checkpoint.

A checkpoint is a statement ``{org, seq, hash, time, legacy_seq}`` of one organization's chain head,
signed with Ed25519. ``legacy_seq`` pins where unkeyed (pre-0004) entries end.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyplane.domain.audit_chain import canonical_json

CHAIN_KEY_INFO = b"keyplane audit chain hmac v2"
SIGNING_KEY_INFO = b"keyplane audit checkpoint ed25519 v1"
_SIGNED_PREFIX = b"keyplane audit checkpoint v1\n"
FORMAT = 1


def _derive(master_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def chain_key(master_key: bytes) -> bytes:
    return _derive(master_key, CHAIN_KEY_INFO)


def signing_key(master_key: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_derive(master_key, SIGNING_KEY_INFO))


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))


@dataclass(frozen=True)
class Checkpoint:
    org: str
    seq: int
    hash: str
    time: str
    legacy_seq: int

    def statement(self, public_key: str) -> dict[str, Any]:
        return {"format": FORMAT, "org": self.org, "seq": self.seq, "hash": self.hash, "time": self.time,
                "legacy_seq": self.legacy_seq, "key": public_key}


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The checkpoint as a JSON-able document: the statement plus its signature."""
    statement = checkpoint.statement(public_key_text(key.public_key()))
    signature = key.sign(_SIGNED_PREFIX + canonical_json(statement).encode("utf-8"))
    return {**statement, "signature": base64.b64encode(signature).decode("ascii")}


class BadCheckpoint(ValueError):
    """A checkpoint document that is malformed or not signed by the expected key."""


def open_signed(document: Any, public_key: Ed25519PublicKey) -> Checkpoint:
    """The checkpoint a document states, if ``public_key`` signed exactly that statement."""
    try:
        statement = {k: document[k] for k in ("format", "org", "seq", "hash", "time", "legacy_seq", "key")}
        signature = base64.b64decode(document["signature"], validate=True)
        if statement["format"] != FORMAT:
            raise BadCheckpoint(f"unknown checkpoint format {statement['format']!r}")
        public_key.verify(signature, _SIGNED_PREFIX + canonical_json(statement).encode("utf-8"))
        if not (isinstance(statement["seq"], int) and isinstance(statement["legacy_seq"], int)
                and all(isinstance(statement[k], str) for k in ("org", "hash", "time"))):
            raise BadCheckpoint("malformed checkpoint")
    except InvalidSignature:
        raise BadCheckpoint("signature does not verify with this keyplane's checkpoint key") from None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BadCheckpoint):
            raise
        raise BadCheckpoint("malformed checkpoint") from None
    return Checkpoint(statement["org"], statement["seq"], statement["hash"], statement["time"],
                      statement["legacy_seq"])
