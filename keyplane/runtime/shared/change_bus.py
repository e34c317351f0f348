"""Change notices: every cache invalidation is published on one Redis channel; every process drops its copy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from keyplane.runtime.shared.state import SharedState

log = logging.getLogger("keyplane.redis")


class ChangeBus:
    """Publishes this process's cache invalidations and applies everyone else's.

    Messages are ``{"o": origin, "k": kind, "t": target}`` with kind ``key``, ``service_account``,
    ``new_secret``, ``all`` or ``brake`` (target ``ip|seconds``).
    """

    def __init__(self, shared: SharedState, apply: Callable[[str, str], None]) -> None:
        self.shared = shared
        self.apply = apply
        self.pending: list[bytes] = []
        self._wake = asyncio.Event()
        self.received = 0
        self.connected = asyncio.Event()
        self.stopped = False

    def publish(self, kind: str, target: str) -> None:
        self.pending.append(orjson.dumps({"o": self.shared.origin, "k": kind, "t": target}))
        with contextlib.suppress(RuntimeError):  # no running loop (a CLI between jobs): flush() sends it
            asyncio.get_running_loop().call_soon(self._wake.set)

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return

        async def send() -> None:
            pipe = self.shared.client.pipeline(transaction=False)
            for message in batch:
                pipe.publish(self.shared.channel, message)
            await pipe.execute()

        async def dropped() -> None:
            # Lost notices are caught by the audit-log poll and the cache TTL.
            log.warning("could not publish %d change notice(s); other processes catch up by polling", len(batch))

        await self.shared.call(send, dropped)

    async def run_publisher(self) -> None:
        # Checks a flag as well as cancellation: redis-py can swallow a CancelledError mid-command.
        while not self.stopped:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    def stop(self) -> None:
        self.stopped = True
        self._wake.set()

    async def run_subscriber(self) -> None:
        """Listen until stopped. After a reconnect, drop everything: notices may have been missed."""
        first = True
        delay = 0.1
        while not self.stopped:
            pubsub = self.shared.client.pubsub()
            try:
                await pubsub.subscribe(self.shared.channel)
                while not self.stopped:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":  # the server confirmed: we are listening
                        if not first:
                            self.apply("all", "")
                            log.warning("change notices resumed; caches dropped in case some were missed")
                        first = False
                        delay = 0.1
                        self.connected.set()
                        self.shared.recovered()
                    elif message.get("type") == "message":
                        self._handle(message["data"])
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisError, OSError) as exc:
                self.connected.clear()
                self.shared.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _handle(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if message.get("o") == self.shared.origin:
            return
        self.received += 1
        self.apply(str(message.get("k", "all")), str(message.get("t", "")))


