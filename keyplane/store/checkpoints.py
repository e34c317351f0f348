"""Where signed audit checkpoints are kept: one JSON file per organization and head, outside the database.

Layout: ``<dir>/<org id>/<seq, 12 digits>.json`` plus ``<dir>/checkpoint-signing.pub`` (the Ed25519
public key, base64) for verifiers elsewhere. A file is never rewritten: it is written to a private
temporary name and hard-linked into place, so several processes (``--workers``, machines sharing the
directory) checkpointing the same head never conflict: exactly one file wins, the others find it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PUBLIC_KEY_FILE = "checkpoint-signing.pub"
_NAME = re.compile(r"^(\d{12})\.json$")
_ORG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CheckpointDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _org_dir(self, org: str) -> Path:
        if not _ORG.match(org):
            raise ValueError(f"not an organization id: {org!r}")
        return self.path / org

    def file_for(self, org: str, seq: int) -> Path:
        return self._org_dir(org) / f"{seq:012d}.json"

    def has(self, org: str, seq: int) -> bool:
        return self.file_for(org, seq).exists()

    def read(self, org: str, seq: int) -> Any:
        return json.loads(self.file_for(org, seq).read_text())

    def write(self, document: dict[str, Any]) -> bool:
        """Write ``document`` under its org and seq unless a checkpoint of that head exists: True if written."""
        target = self.file_for(document["org"], document["seq"])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(document, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def write_public_key(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / PUBLIC_KEY_FILE
        if not path.exists() or path.read_text().strip() != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)

    def seqs(self, org: str) -> list[int]:
        """The checkpointed sequence numbers of one organization, ascending (names only, nothing parsed)."""
        try:
            entries = os.scandir(self._org_dir(org))
        except FileNotFoundError:
            return []
        with entries:
            return sorted(int(m.group(1)) for e in entries if (m := _NAME.match(e.name)))

    def newest(self, org: str) -> tuple[int, Any] | None:
        seqs = self.seqs(org)
        return (seqs[-1], self.read(org, seqs[-1])) if seqs else None

    def every(self, org: str) -> Iterator[tuple[int, Any]]:
        for seq in self.seqs(org):
            yield seq, self.read(org, seq)
