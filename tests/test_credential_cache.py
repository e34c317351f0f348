"""The credential cache under concurrent change notices: a new secret spoils only its own negative answer."""

from __future__ import annotations

import asyncio

from keyplane.runtime.cache import ABSENT, CredentialCache


def _cache() -> CredentialCache[str]:
    return CredentialCache(maxsize=16, ttl=60, negative_maxsize=16, negative_ttl=60)


async def _load_while(cache: CredentialCache[str], digest: str, value: str | None, during: object) -> None:
    """Load ``digest`` (answering ``value``) and run ``during()`` while the load is in flight."""
    started, release = asyncio.Event(), asyncio.Event()

    async def loader(_digest: str) -> str | None:
        started.set()
        await release.wait()
        return value

    task = asyncio.create_task(cache.load(digest, loader, lambda v: (v,)))
    await started.wait()
    during()  # type: ignore[operator]
    release.set()
    assert await task == value


async def test_a_new_secret_elsewhere_does_not_stop_other_loads_from_caching() -> None:
    # Another process created a key (a new_secret notice) while this one was loading an existing key:
    # the loaded key must stay cached, or every creation anywhere costs every in-flight lookup a reload.
    cache = _cache()
    await _load_while(cache, "existing", "row", lambda: cache.forget_negative("brand-new"))
    assert cache.peek("existing") == "row"


async def test_a_secret_born_during_its_own_load_is_not_cached_as_unknown() -> None:
    # The load read "unknown" just before the secret was stored: caching that would refuse a real key.
    cache = _cache()
    await _load_while(cache, "brand-new", None, lambda: cache.forget_negative("brand-new"))
    assert cache.peek("brand-new") is None  # a miss: the next request asks the store again
    await _load_while(cache, "still-unknown", None, lambda: cache.forget_negative("brand-new"))
    assert cache.peek("still-unknown") is ABSENT  # other hashes' negative answers are still cached


async def test_an_invalidation_during_a_load_keeps_its_result_out_of_the_cache() -> None:
    cache = _cache()
    await _load_while(cache, "key", "old-row", lambda: cache.invalidate("key"))
    assert cache.peek("key") is None
