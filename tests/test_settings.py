"""Every setting is checked when it is read: a bad one is one line naming it, with the fix, and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from keyplane.config import Settings, describe_invalid
from tests.conftest import TEST_MASTER_KEY
from tests.processes import cli


@pytest.mark.parametrize(("field", "value"), [
    ("port", 0), ("port", 80000), ("port", -1), ("workers", 0), ("workers", 10_000), ("key_cache_size", 0),
    ("key_cache_ttl_seconds", 0), ("negative_cache_ttl_seconds", -1), ("change_poll_seconds", 0),
    ("redis_timeout_seconds", 0), ("redis_max_connections", 0), ("upstream_max_connections", 0),
    ("alert_interval_seconds", 0), ("last_used_flush_seconds", 0), ("recent_use_window_seconds", 0),
    ("brake_max_failures", 0), ("brake_block_seconds", 0), ("max_body_bytes", 10), ("log_level", "LOUD"),
    ("public_url", "keys.example.com"), ("public_url", "https://keys.example.com:99999"),
    ("master_key", "c2hvcnQ="), ("database_url", "mysql://x"), ("redis_fail_mode", "maybe"),
])
def test_out_of_range_settings_are_refused(field: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path, **{field: value})
    (line,) = describe_invalid(refused.value)
    assert line.startswith(f"KEYPLANE_{field.upper()}")
    assert "c2hvcnQ=" not in line  # a master key, even a bad one, is never echoed


def test_good_settings_pass_and_are_normalised(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, port=65535, log_level="debug", public_url="https://keys.example.com/")
    assert (s.port, s.log_level, s.public_url) == (65535, "DEBUG", "https://keys.example.com")
    assert s.base_url == "https://keys.example.com"
    assert Settings(home=tmp_path, database_url="postgresql+asyncpg://u@h/db", master_key=TEST_MASTER_KEY)


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({}, ["serve", "--port", "80000"], "KEYPLANE_PORT=80000 is not valid: input should be less than or equal to 65535"),
    ({"KEYPLANE_PORT": "http"}, ["serve"], "KEYPLANE_PORT=http is not valid: input should be a valid integer, "
                                      "unable to parse string as an integer"),
    ({"KEYPLANE_WORKERS": "0"}, ["keys", "list"],
     "KEYPLANE_WORKERS=0 is not valid: input should be greater than or equal to 1"),
    ({"KEYPLANE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none"}, ["serve"],
     "KEYPLANE_MASTER_KEY is required with PostgreSQL (the same value on every machine): create one with "
     "`keyplane token generate --kind master` and export KEYPLANE_MASTER_KEY=<it>"),
])
def test_the_cli_says_what_is_wrong_in_one_line(env: dict[str, str], args: list[str], expected: str,
                                                tmp_path: Path) -> None:
    result = cli({"KEYPLANE_HOME": str(tmp_path / "home"), **env}, *args, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: {expected}"
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 3
    assert not (tmp_path / "home" / "keyplane.db").exists()  # refused before anything was created


def test_token_generate_makes_a_master_key(tmp_path: Path) -> None:
    key = cli({"KEYPLANE_HOME": str(tmp_path)}, "token", "generate", "--kind", "master").stdout.strip()
    assert Settings(home=tmp_path, database_url="postgresql+asyncpg://u@h/db", master_key=key).master_key == key


def test_a_store_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    env = {"KEYPLANE_HOME": str(tmp_path), "KEYPLANE_MASTER_KEY": TEST_MASTER_KEY,
           "KEYPLANE_DATABASE_URL": "postgresql+asyncpg://postgres:sekret@127.0.0.1:1/none"}
    result = cli(env, "keys", "list", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot open the store at postgresql+asyncpg://postgres:***@127.0.0.1:1/none")
    assert "KEYPLANE_DATABASE_URL" in line and "sekret" not in line


def test_any_asgi_server_gets_the_same_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.processes import env_for

    result = subprocess.run([sys.executable, "-c", "import keyplane.asgi"], capture_output=True, text=True,
                            env=env_for({"KEYPLANE_HOME": str(tmp_path), "KEYPLANE_MAX_BODY_BYTES": "-1"}), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("error: KEYPLANE_MAX_BODY_BYTES=-1 is not valid")
