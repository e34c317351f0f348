"""How the service layer tells the hot path that something it may have cached changed."""

from __future__ import annotations

from typing import Protocol


class Invalidator(Protocol):
    def key(self, key_id: str) -> None: ...  # the key and everything under it (sub-keys)
    def service_account(self, sa_id: str) -> None: ...
    def new_secret(self, digest: str) -> None: ...  # a hash that may sit in the negative cache
    def all(self) -> None: ...


class NoInvalidation:
    """For processes with no cache of their own (the CLI); running servers notice by polling."""

    def key(self, key_id: str) -> None:
        pass

    def service_account(self, sa_id: str) -> None:
        pass

    def new_secret(self, digest: str) -> None:
        pass

    def all(self) -> None:
        pass
