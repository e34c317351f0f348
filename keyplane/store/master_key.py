"""Where the master key comes from: KEYPLANE_MASTER_KEY, or a 0600 file the first start creates."""

from __future__ import annotations

import os
from pathlib import Path

from keyplane.domain.secrets_box import new_master_key, parse_master_key


class MasterKeyMissing(RuntimeError):
    """The deployment needs KEYPLANE_MASTER_KEY and it is not set."""


def load_or_create(env_value: str | None, path: Path) -> bytes:
    if env_value:
        return parse_master_key(env_value)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {oct(mode)}): chmod 600 it")
        return parse_master_key(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a private temp file, then link it into place: two processes starting at once
    # never see a half-written key, and exactly one key wins.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_master_key() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return parse_master_key(path.read_text())
