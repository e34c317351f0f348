"""Provider secrets at rest: AES-256-GCM under the master key, with the provider id as associated data
(a ciphertext copied onto another provider's row does not decrypt)."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
VERSION = b"\x01"


class SecretBox:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key is 32 bytes (base64 in KEYPLANE_MASTER_KEY)")
        self._aead = AESGCM(master_key)

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return base64.b64encode(VERSION + nonce + sealed).decode("ascii")

    def open(self, token: str, context: str) -> str:
        raw = base64.b64decode(token)
        if raw[:1] != VERSION:
            raise ValueError("unknown secret format")
        nonce, sealed = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
        return self._aead.decrypt(nonce, sealed, context.encode("utf-8")).decode("utf-8")


def parse_master_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        raise ValueError("KEYPLANE_MASTER_KEY must be base64 of 32 random bytes") from None
    if len(key) != 32:
        raise ValueError("KEYPLANE_MASTER_KEY must be base64 of 32 random bytes")
    return key


def new_master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")
