"""The master key, and what is derived from it: the secret box, the audit chain key, the checkpoint signing key."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyplane.config import Settings
from keyplane.domain import audit_checkpoint
from keyplane.domain.secrets_box import SecretBox
from keyplane.store import master_key


class MasterSecrets:
    """The ``Keyplane`` methods that load the master key once and derive from it (mixed into ``Keyplane``)."""

    settings: Settings
    _master: bytes | None
    _box: SecretBox | None
    _chain_key: bytes | None
    _signing_key: Ed25519PrivateKey | None

    def secret_box(self) -> SecretBox:
        """The master key, loaded on first use: from KEYPLANE_MASTER_KEY (required on PostgreSQL: see Settings),
        or a 0600 file under home."""
        if self._box is None:
            self._box = SecretBox(self.load_master_key())
        return self._box

    def load_master_key(self) -> bytes:
        """The master key: from KEYPLANE_MASTER_KEY, or a 0600 file under home (SQLite only)."""
        if self._master is None:
            if not self.settings.master_key and not self.settings.is_sqlite:
                raise master_key.MasterKeyMissing(
                    "KEYPLANE_MASTER_KEY must be set with PostgreSQL (the same on every machine): it seals provider "
                    "secrets and keys the audit chain")
            self._master = master_key.load_or_create(self.settings.master_key, self.settings.home / "master.key")
        return self._master

    def audit_chain_key(self) -> bytes:
        """The HMAC key of the audit chain, derived from the master key (never stored)."""
        if self._chain_key is None:
            self._chain_key = audit_checkpoint.chain_key(self.load_master_key())
        return self._chain_key

    def checkpoint_signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key that signs audit checkpoints, derived from the master key (never stored)."""
        if self._signing_key is None:
            self._signing_key = audit_checkpoint.signing_key(self.load_master_key())
        return self._signing_key

