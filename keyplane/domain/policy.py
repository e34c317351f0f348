"""A virtual key's policy as the hot path sees it, and the pure checks applied to it."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Verify-API result codes, in the order the checks run.
VALID = "VALID"
NOT_FOUND = "NOT_FOUND"
DISABLED = "DISABLED"
EXPIRED = "EXPIRED"
INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"
IP_NOT_ALLOWED = "IP_NOT_ALLOWED"

MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_IP_ALLOWLIST = 64


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Raises ValueError naming the bad entry; a bare address is a /32 or /128."""
    nets = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"'{cidr}' is not an IPv4/IPv6 address or CIDR") from None
    return tuple(nets)


@functools.lru_cache(maxsize=8192)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parsed once per distinct client address (parsing is most of an allowlist check's cost)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_allowed(networks: tuple[IPNetwork, ...], ip: str | None) -> bool:
    if not networks:
        return True
    addr = _address(ip) if ip else None
    if addr is None:
        return False
    return any(addr in net for net in networks)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    cost_per_day_usd: float | None = None
    budget_per_month_usd: float | None = None
    # An answer longer than the budget pays for: lower max_tokens to fit (True) or refuse the request.
    clamp_output: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "cost_per_day_usd": self.cost_per_day_usd,
            "budget_per_month_usd": self.budget_per_month_usd,
        }

    @property
    def has_spend_limit(self) -> bool:
        return (self.tokens_per_minute is not None or self.cost_per_day_usd is not None
                or self.budget_per_month_usd is not None)

    def exceeds(self, parent: Limits) -> list[str]:
        """Names of the limits where ``self`` is looser than ``parent`` (None = unlimited)."""
        looser = []
        for name, mine in self.as_dict().items():
            theirs = getattr(parent, name)
            if theirs is not None and (mine is None or mine > theirs):
                looser.append(name)
        return looser


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """Everything a request needs to decide on a key, folded with its ancestors at load time.

    ``status`` is the effective one: a disabled or deleted ancestor makes it "disabled";
    ``expires_at`` is the earliest of the key's and its ancestors' expiries (unix seconds).
    ``valid_until`` is set when this snapshot was found under the previous secret of a rotation.
    """

    id: str
    org_id: str
    name: str
    status: str
    scopes: frozenset[str]
    expires_at: float | None
    # Every non-empty IP allowlist of the key and its ancestors: a client must be admitted by each one,
    # so a sub-key is never reachable from where its parent is not.
    allowlists: tuple[tuple[IPNetwork, ...], ...]
    limits: Limits
    limit_profile: str | None
    ancestor_ids: tuple[str, ...] = ()
    require_signature: bool = False
    allowed_models: tuple[str, ...] = ()
    cost_center: str | None = None
    environment: str | None = None
    valid_until: float | None = None
    # (bucket id, requests per minute) for this key and each ancestor with a request limit:
    # a sub-key's request counts against its parent's bucket too.
    buckets: tuple[tuple[str, int], ...] = ()
    # (bucket id, limits) for this key and each ancestor with a token, daily-cost or monthly limit.
    spend_limits: tuple[tuple[str, Limits], ...] = ()
    # MCP permissions of the key and of each ancestor (keyplane.domain.mcp_access): all must allow.
    mcp_grants: tuple[Mapping[str, tuple[str, ...]], ...] = ()
    # The verify API's view of the key, serialized once at load time (compact: ~10x smaller than a dict).
    public_json: bytes = field(default=b"null", compare=False)
    # Every bucket a request's tokens and cost count against: the key and all its ancestors (set from id and
    # ancestor_ids once per snapshot, not built on every request).
    spend_buckets: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spend_buckets", (self.id, *self.ancestor_ids))  # frozen: set once, here

    @property
    def parent_id(self) -> str | None:
        return self.ancestor_ids[0] if self.ancestor_ids else None


def check(
    key: KeySnapshot | None,
    now: float,
    *,
    scopes: Iterable[str] = (),
    ip: str | None = None,
) -> tuple[str, str | None]:
    """The verify-API decision. Returns (code, missing scope or None)."""
    if key is None or (key.valid_until is not None and now >= key.valid_until):
        return NOT_FOUND, None
    if key.status != "enabled":
        return DISABLED, None
    if key.expires_at is not None and now >= key.expires_at:
        return EXPIRED, None
    for networks in key.allowlists:
        if not ip_allowed(networks, ip):
            return IP_NOT_ALLOWED, None
    for scope in scopes:
        if scope not in key.scopes:
            return INSUFFICIENT_SCOPE, scope
    return VALID, None


def validate_metadata(metadata: dict[str, Any]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ValueError(f"metadata holds at most {MAX_METADATA_ENTRIES} entries")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("metadata is a map of strings to strings")
        if not k or len(k) > MAX_METADATA_KEY:
            raise ValueError(f"metadata keys are 1 to {MAX_METADATA_KEY} characters")
        if len(v) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata values are at most {MAX_METADATA_VALUE} characters")
