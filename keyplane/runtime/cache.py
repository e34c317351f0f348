"""Bounded LRU caches with a TTL for the hot path: positive entries, negative entries, single-flight."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")


class _Absent:
    """Marks a hash the store does not know (negative cache entry)."""


ABSENT = _Absent()


class TTLCache(Generic[V]):
    """An LRU of at most ``maxsize`` entries, each valid for ``ttl`` seconds.

    ``tags`` name the ids an entry depends on (a key and its ancestors), so that a change to any
    of them drops every entry built from it.
    """

    def __init__(self, maxsize: int, ttl: float) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._data: OrderedDict[str, tuple[float, V, tuple[str, ...]]] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, now: float | None = None) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        stored_at, value, _tags = item
        if (now if now is not None else time.monotonic()) - stored_at > self.ttl:
            return None  # expired, but kept (LRU-bounded) as a last resort while the store is down
        self._data.move_to_end(key)
        return value

    def stale(self, key: str) -> V | None:
        """An entry past its TTL that no invalidation has dropped."""
        item = self._data.get(key)
        return item[1] if item is not None else None

    def put(self, key: str, value: V, tags: Iterable[str] = ()) -> None:
        if key in self._data:
            self._remove(key)
        tags = tuple(tags)
        self._data[key] = (time.monotonic(), value, tags)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._data) > self.maxsize:
            oldest = next(iter(self._data))
            self._remove(oldest)

    def discard(self, key: str) -> None:
        if key in self._data:
            self._remove(key)

    def invalidate_tag(self, tag: str) -> int:
        keys = self._by_tag.pop(tag, set())
        for key in keys:
            self._remove(key)
        return len(keys)

    def clear(self) -> None:
        self._data.clear()
        self._by_tag.clear()

    def _remove(self, key: str) -> None:
        _stored, _value, tags = self._data.pop(key)
        for tag in tags:
            bucket = self._by_tag.get(tag)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self._by_tag[tag]


class CredentialCache(Generic[V]):
    """Credential lookups by SHA-256: positive cache, negative cache, one store load per hash at a time."""

    def __init__(self, maxsize: int, ttl: float, negative_maxsize: int, negative_ttl: float) -> None:
        self.positive: TTLCache[V] = TTLCache(maxsize, ttl)
        self.negative: TTLCache[_Absent] = TTLCache(negative_maxsize, negative_ttl)
        self._inflight: dict[str, asyncio.Future[V | None]] = {}
        self.hits = 0
        self.misses = 0
        self.stale_served = 0
        # Bumped on every invalidation: a load that started before one must not cache its result.
        self._generation = 0
        # Hashes that became real secrets while a load of them was in flight: that load may have
        # read "unknown" just before the secret was stored, so its negative answer is not cached.
        self._born_while_loading: set[str] = set()

    def peek(self, digest: str) -> V | _Absent | None:
        """A cached answer (the value, or ABSENT for a known-unknown hash), or None on a miss."""
        value = self.positive.get(digest)
        if value is not None:
            self.hits += 1
            return value
        if self.negative.get(digest) is not None:
            self.hits += 1
            return ABSENT
        return None

    async def load(
        self,
        digest: str,
        loader: Callable[[str], Awaitable[V | None]],
        tags_of: Callable[[V], Iterable[str]],
    ) -> V | None:
        self.misses += 1
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        generation = self._generation
        try:
            value = await loader(digest)
        except Exception as exc:
            # Store unreachable: serve what we had unless a change notice dropped it (stale-if-error).
            stale = self.positive.stale(digest) if generation == self._generation else None
            if stale is not None:
                self.stale_served += 1
                fut.set_result(stale)
                return stale
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            self._inflight.pop(digest, None)
            born = digest in self._born_while_loading
            self._born_while_loading.discard(digest)
        if generation == self._generation:
            if value is not None:
                self.positive.put(digest, value, tags_of(value))
            elif not born:
                self.negative.put(digest, ABSENT)
        fut.set_result(value)
        return value

    def invalidate(self, tag: str) -> None:
        self._generation += 1
        self.positive.invalidate_tag(tag)

    def forget_negative(self, digest: str) -> None:
        """A secret with this hash was just created: it is no longer unknown.

        Only a load of this very hash can be wrong about it, and only in the negative: bumping the
        generation here would stop every concurrent load in this process from caching what it read
        (one key created anywhere made every in-flight lookup miss again).
        """
        self.negative.discard(digest)
        if digest in self._inflight:
            self._born_while_loading.add(digest)

    def clear(self) -> None:
        self._generation += 1
        self.positive.clear()
        self.negative.clear()
