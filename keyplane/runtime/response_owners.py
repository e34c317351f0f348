"""Which key created which stored Responses-API answer, on which model, and how many tokens it holds.

``GET /v1/responses/{id}`` is routed by it, and a key reads back (or continues, ``previous_response_id``) only
its own answers: the upstream keeps every key's answers under one provider account, so an id alone must not be
enough. The tokens (the answer's input and output: the conversation a follow-up makes the upstream read) count
in a follow-up's reservation. In this process (bounded), and in Redis in the distributed mode so any process
can serve the retrieve.
"""

from __future__ import annotations

from collections import OrderedDict

from keyplane.runtime.shared import SharedState

TTL_SECONDS = 30 * 86400  # OpenAI keeps stored responses for 30 days by default


class ResponseOwners:
    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._owners: OrderedDict[str, tuple[str, str, int]] = OrderedDict()

    async def remember(self, response_id: str, key_id: str, model: str, tokens: int = 0) -> None:
        self._owners[response_id] = (key_id, model, tokens)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.size:
            self._owners.popitem(last=False)

    async def model_for(self, response_id: str, key_id: str) -> str | None:
        owner = self._owners.get(response_id)
        return owner[1] if owner is not None and owner[0] == key_id else None

    async def owner_of(self, response_id: str) -> tuple[str, int] | None:
        """The key that created the answer and the tokens it holds, where known (None: an answer this gateway
        never stored)."""
        owner = self._owners.get(response_id)
        return (owner[0], owner[2]) if owner is not None else None


class SharedResponseOwners(ResponseOwners):
    """Also in Redis (one SET per answer, expiring with it); this process's own map when Redis is down."""

    def __init__(self, shared: SharedState, size: int = 100_000) -> None:
        super().__init__(size)
        self.shared = shared

    def _key(self, response_id: str) -> str:
        return f"{self.shared.prefix}ro:{response_id}"

    async def remember(self, response_id: str, key_id: str, model: str, tokens: int = 0) -> None:
        await super().remember(response_id, key_id, model, tokens)

        async def in_redis() -> None:
            await self.shared.client.set(self._key(response_id), f"{key_id}\n{model}\n{tokens}", ex=TTL_SECONDS)

        async def skip() -> None:
            return None

        await self.shared.call(in_redis, skip)

    async def model_for(self, response_id: str, key_id: str) -> str | None:
        local = await super().model_for(response_id, key_id)
        if local is not None:
            return local

        async def in_redis() -> str | None:
            raw = await self.shared.client.get(self._key(response_id))
            if raw is None:
                return None
            owner, model, _tokens = _fields(raw)
            return model if owner == key_id else None

        async def unknown() -> str | None:
            return None

        return await self.shared.call(in_redis, unknown)

    async def owner_of(self, response_id: str) -> tuple[str, int] | None:
        local = await super().owner_of(response_id)
        if local is not None:
            return local

        async def in_redis() -> tuple[str, int] | None:
            raw = await self.shared.client.get(self._key(response_id))
            if raw is None:
                return None
            owner, _model, tokens = _fields(raw)
            return owner, tokens

        async def unknown() -> tuple[str, int] | None:
            return None

        return await self.shared.call(in_redis, unknown)


def _fields(raw: bytes) -> tuple[str, str, int]:
    """A Redis record: "key\\nmodel\\ntokens" ("key\\nmodel" as written before tokens were kept)."""
    owner, _, rest = raw.decode().partition("\n")
    model, _, tokens = rest.partition("\n")
    return owner, model, int(tokens) if tokens.isdigit() else 0
