"""The client's address: the socket peer, unless the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import MutableMapping
from typing import Any

from keyplane.domain.policy import IPNetwork, parse_networks


class ClientAddress:
    def __init__(self, trusted_proxies: str) -> None:
        cidrs = [c for c in (part.strip() for part in trusted_proxies.split(",")) if c]
        self.trusted: tuple[IPNetwork, ...] = parse_networks(cidrs)

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    def of(self, scope: MutableMapping[str, Any]) -> str:
        """The client of an ASGI request (HTTP or WebSocket scope)."""
        client = scope.get("client")
        peer = client[0] if client else ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        forwarded = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"), None)
        if not forwarded:
            return peer
        # Walk from the right: the first hop that is not one of our proxies is the client.
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer
