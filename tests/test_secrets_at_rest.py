"""Provider secrets at rest: AES-GCM under the master key, bound to their row; the key file is private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from pydantic import ValidationError

from keyplane.config import Settings
from keyplane.domain.secrets_box import SecretBox, new_master_key, parse_master_key
from keyplane.services.container import Keyplane
from keyplane.store import master_key


def test_sealed_secrets_open_only_with_the_same_key_and_row() -> None:
    box = SecretBox(parse_master_key(new_master_key()))
    sealed = box.seal("sk-real-secret", "prv_a")
    assert "sk-real-secret" not in sealed and box.seal("sk-real-secret", "prv_a") != sealed  # fresh nonce
    assert box.open(sealed, "prv_a") == "sk-real-secret"
    with pytest.raises(InvalidTag):
        box.open(sealed, "prv_b")  # copied onto another provider's row
    with pytest.raises(InvalidTag):
        SecretBox(parse_master_key(new_master_key())).open(sealed, "prv_a")


def test_master_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "home" / "master.key"
    first = master_key.load_or_create(None, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert master_key.load_or_create(None, path) == first
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        master_key.load_or_create(None, path)
    env_key = new_master_key()
    assert master_key.load_or_create(env_key, path) == parse_master_key(env_key)
    with pytest.raises(ValueError, match="32 random bytes"):
        parse_master_key("c2hvcnQ=")


def test_a_new_home_is_private(tmp_path: Path) -> None:
    Keyplane(Settings(home=tmp_path / "fresh-home"))
    assert (tmp_path / "fresh-home").stat().st_mode & 0o777 == 0o700


def test_postgresql_requires_an_explicit_master_key(tmp_path: Path) -> None:
    # Refused when the settings are read, before anything connects (the CLI turns it into one line).
    with pytest.raises(ValidationError, match="KEYPLANE_MASTER_KEY is required with PostgreSQL"):
        Settings(home=tmp_path, database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
