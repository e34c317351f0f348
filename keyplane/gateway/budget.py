"""A budgeted request's worst case, reserved before it is forwarded (runtime/spend.py holds the counters).

    worst case = estimated prompt + output allowance
    prompt     = request body bytes / KEYPLANE_PROMPT_BYTES_PER_TOKEN (default 3: English runs ~4 bytes
                 per token, CJK ~3; 1 is an upper bound for text, since a token is at least one byte),
                 priced at the dearer of the input and cache-write prices
    output     = the request's max_tokens (max_completion_tokens, max_output_tokens) times its choices (n,
                 or best_of where larger: Completions generates and bills best_of answers),
                 or KEYPLANE_OUTPUT_ALLOWANCE_TOKENS when it names none, priced at the output price

When the allowance does not fit the tightest window the key or a parent has left, it is lowered to what
does fit and written into the request (the answer says so in ``X-Keyplane-Max-Tokens-Clamped``), unless
a limit profile on the way says ``clamp_output: false``: then the request is refused.

Which field is lowered: every bound the request names (``max_tokens`` and ``max_completion_tokens`` on Chat
Completions, ``max_output_tokens`` on Responses, ``max_tokens`` on Anthropic Messages). When a Chat
Completions request names none, the field is chosen by model family: OpenAI's reasoning models (``o1``,
``o3``, ``o4-mini``… and ``gpt-5``…, with or without a ``provider/`` prefix) refuse ``max_tokens`` and get
``max_completion_tokens``; every other model gets ``max_tokens``, which every OpenAI-compatible server knows.
"""

from __future__ import annotations

import functools
import math
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keyplane.domain.errors import KeyplaneError, invalid_request
from keyplane.domain.policy import KeySnapshot
from keyplane.gateway.wire import Api
from keyplane.runtime.spend import Ask, Chain, Exhausted, SpendLedger
from keyplane.services.providers import Route

if TYPE_CHECKING:
    from keyplane.gateway.proxy import Outcome

CLAMPED_HEADER = b"x-keyplane-max-tokens-clamped"
# OpenAI's reasoning models: Chat Completions refuses max_tokens for them ("use max_completion_tokens").
_REASONING_MODEL = re.compile(r"(o[1-9]\d*|gpt-5)([-.:_].*)?", re.IGNORECASE)


# How many answers a request generates, each up to its output bound: ``n``, and ``best_of`` (Completions
# generates, and bills, that many server-side and returns the best ``n``).
CHOICES = ("n", "best_of")
Worst = tuple[int, float, int, float, bool, int, int]  # an Ask's fields, in its order


def ask_for(api: Api, request: dict[str, Any], body_len: int, route: Route, key: KeySnapshot,
            bytes_per_token: float, default_allowance: int) -> Ask:
    """The request's worst case; ``named`` on it: the smallest output bound the request names (0: none)."""
    return Ask(*worst_case(api, request, body_len, route, key, bytes_per_token, default_allowance))


def worst_case(api: Api, request: dict[str, Any], body_len: int, route: Route, key: KeySnapshot,
               bytes_per_token: float, default_allowance: int) -> Worst:
    """:func:`ask_for`'s fields as a tuple (prompt tokens, prompt USD, output tokens wanted, USD per output
    token, clamp, named, choices): the gateway's embedded path reserves from them without building an Ask."""
    prompt_tokens = math.ceil(body_len / bytes_per_token) or 1
    prompt_price = prompt_usd_per_token(route)
    clamp = clamps(key)
    fields = api.output_fields
    if not fields:
        return prompt_tokens, prompt_tokens * prompt_price, 0, 0.0, clamp, 0, 1
    named = 0 if request.keys().isdisjoint(fields) else named_bound(fields, request)  # one C call: none named
    choices = 1
    if not request.keys().isdisjoint(CHOICES):
        for name in CHOICES:
            value = request.get(name)
            if type(value) is int and value > 0:
                choices = max(choices, value)
            elif value is not None:  # "8" or 8.0: many servers read 8 choices, which the reservation must cover
                raise invalid_request(f"'{name}' must be a positive integer", param=name)
    return (prompt_tokens, prompt_tokens * prompt_price, (named or default_allowance) * choices,
            route.output_per_mtok / 1e6, clamp, named, choices)


def prompt_usd_per_token(route: Route) -> float:
    """A prompt token's worst price: the dearer of the input and cache-write prices."""
    write = route.cache_write_per_mtok
    return (write if write is not None and write > route.input_per_mtok else route.input_per_mtok) / 1e6


def clamps(key: KeySnapshot) -> bool:
    """May a request's output bound be lowered to what the budget covers: unless a limit profile of the key
    or a parent says ``clamp_output: false``."""
    return all(limits.clamp_output for _bucket, limits in key.spend_limits)


def bound_field(api: Api, model: Any) -> str:
    """The output bound set on a request that names none: by model family (the module's docstring)."""
    fields = api.output_fields
    if "max_completion_tokens" in fields and isinstance(model, str) and _is_reasoning_name(model):
        return "max_completion_tokens"
    return fields[0]


class Plan:
    """What a budgeted request needs, worked out once per (key snapshot, route, API) instead of per request,
    so that the common request is reserved in a few comparisons (:meth:`reserve`): every window has room for
    its whole worst case, so nothing is clamped and :meth:`SpendLedger.reserve_whole
    <keyplane.runtime.spend.SpendLedger.reserve_whole>` holds it as the rule would. The rule itself
    (:func:`worst_case`, ``SpendLedger.reserve_worst``) decides every other request: a window that binds, a new
    minute, ``n`` choices, a bound named as something other than a positive int, clamping off without a bound."""

    __slots__ = ("allowance", "bytes_per_token", "chain", "clamp", "field", "fields", "header", "key", "ledger",
                 "member", "price", "prompt_price", "route")

    def __init__(self, key: KeySnapshot, route: Route, api: Api, model: str, ledger: SpendLedger, chain: Chain,
                 bytes_per_token: float, allowance: int) -> None:
        self.key, self.route, self.ledger, self.chain = key, route, ledger, chain
        self.bytes_per_token = bytes_per_token
        self.prompt_price = prompt_usd_per_token(route)
        self.fields = api.output_fields
        self.clamp = clamps(key)
        # The output's price and the allowance a request naming no bound gets, with the field, the JSON member
        # and the header that set and say it; an API without an output bound (embeddings) reserves its prompt.
        self.price = route.output_per_mtok / 1e6 if api.output_fields else 0.0
        self.allowance = allowance if api.output_fields else 0
        self.field = bound_field(api, model) if api.output_fields else ""
        self.member = _member(self.field, allowance) if self.field in _MEMBERS else None
        self.header = (CLAMPED_HEADER, b"%d" % allowance)

    def reserve(self, request: dict[str, Any], body_len: int, outcome: Outcome,
                headers: list[tuple[bytes, bytes]]) -> bool | bytes | None:
        """Reserve ``request`` whole if every window has room for it: the grant goes on ``outcome``, and a
        request that named no bound gets the allowance (the header says so, in ``headers``). Returns what
        ``proxy._granted`` would (False: sent unchanged; bytes: the member to splice in), or None, with nothing
        reserved: the rule decides."""
        if not request.keys().isdisjoint(CHOICES):  # n, best_of: the rule counts (or refuses) them
            return None
        ptok = math.ceil(body_len / self.bytes_per_token) or 1  # as worst_case
        fields = self.fields
        if request.keys().isdisjoint(fields):
            if fields and not self.clamp:
                return None  # the rule refuses a bound it may not set (unbounded)
            grant = self.ledger.reserve_whole(self.chain, ptok, ptok * self.prompt_price, self.allowance, self.price)
            if grant is None:
                return None
            outcome.grant = grant
            if not fields:
                return False
            request[self.field] = self.allowance
            headers.append(self.header)
            return self.member or True
        named = 0  # the smallest bound named, every one named a positive int (else the rule sets them)
        for name in fields:
            value = request.get(name)
            if value is not None:
                if type(value) is not int or value < 1:
                    return None
                if not named or value < named:
                    named = value
        if not named:
            return None
        grant = self.ledger.reserve_whole(self.chain, ptok, ptok * self.prompt_price, named, self.price)
        if grant is None:
            return None
        outcome.grant = grant
        return False  # its bound fits whole: sent as it came


def named_bound(fields: tuple[str, ...], request: dict[str, Any]) -> int:
    """The smallest output bound ``request`` names in ``fields``, or 0 when it names none: a positive int
    (``type()`` is, not ``isinstance``: True is an int to isinstance, and a bound of True is no bound)."""
    named = 0
    for name in fields:
        value = request.get(name)
        if type(value) is int and value > 0 and (not named or value < named):
            named = value
    return named


def refusal(spent: Exhausted) -> KeyplaneError:
    """The request's worst case does not fit what a window has left (settled and reserved spend deducted)."""
    retry_after = max(1, math.ceil(spent.resets_at - time.time()))
    resets_at = datetime.fromtimestamp(spent.resets_at, UTC).isoformat().replace("+00:00", "Z")
    what = "tokens this minute" if spent.is_rate else "USD"
    left = f"{spent.remaining:.0f}" if spent.is_rate else f"{spent.remaining:.6g}"
    return KeyplaneError(
        429, "tokens_exceeded" if spent.is_rate else "budget_exceeded",
        f"Limit {spent.limit} of {spent.value:g} {what}: {left} left (in-flight requests' reservations "
        f"deducted), not enough for this request; it resets at {resets_at}",
        headers={"Retry-After": str(retry_after)},
        extra={"limit": spent.limit, "remaining": round(spent.remaining, 9), "resets_at": resets_at,
               "retry_after": retry_after},
    )


def unbounded(api: Api) -> KeyplaneError:
    """``clamp_output: false`` and no output bound named: the answer's cost cannot be bounded beforehand."""
    return invalid_request(f"This key's limit profile refuses answers of unbounded length: name "
                           f"'{api.output_fields[0]}'", param=api.output_fields[0])


def is_reasoning_model(model: Any) -> bool:
    """o1, o3-mini, o4-mini-2025-04-16, gpt-5, gpt-5.1-codex, openai/o3…: the models that need
    ``max_completion_tokens`` on Chat Completions."""
    return isinstance(model, str) and _is_reasoning_name(model)


@functools.lru_cache(maxsize=1024)  # a deployment has few model names: the regex runs once per name
def _is_reasoning_name(model: str) -> bool:
    return _REASONING_MODEL.fullmatch(model.rsplit("/", 1)[-1]) is not None


# Per output bound field, bound -> the JSON member spliced into a body that names none ('"max_tokens":N,'),
# and bound -> its digits (the clamp header's value): formatted once per value, not per request (a bound is
# the default allowance, or what a nearly spent budget leaves). Bounded: cleared when full.
_MEMBERS: dict[str, dict[int, bytes]] = {name: {} for name in ("max_tokens", "max_completion_tokens",
                                                                "max_output_tokens")}
DIGITS: dict[int, bytes] = {}


def digits(n: int) -> bytes:
    """``b"%d" % n``, remembered (read ``DIGITS.get(n)`` first: no call where it is there)."""
    if len(DIGITS) >= 4096:
        DIGITS.clear()
    found = DIGITS[n] = b"%d" % n
    return found


def _member(field: str, n: int) -> bytes:
    members = _MEMBERS[field]
    if len(members) >= 4096:
        members.clear()
    found = members[n] = b'"%b":%d,' % (field.encode(), n)
    return found


def apply_allowance(api: Api, request: dict[str, Any], granted: int, named: int, choices: int
                    ) -> tuple[int, bytes | None]:
    """Write the granted output bound (``granted`` is for all choices together) into the request: every bound
    field it named is lowered; when it named none, the field the model takes is set. ``named``, ``choices``: what
    :func:`worst_case` read. Returns the bound now in effect per choice (the first named field's, or the one
    set), and, when the field set was absent from the request (not null, not 0: absent), the JSON member that
    sets it (``"max_tokens":N,``), which the gateway splices into the body as sent instead of re-encoding it."""
    per_choice = (granted if choices == 1 else granted // choices) or 1
    if not named:  # nothing to lower: set the one field, chosen by model family (the module's docstring)
        field = bound_field(api, request.get("model"))
        absent = field not in request
        request[field] = per_choice
        for other in api.output_fields:  # "100000" or 1e5 in the other field: a lax server reads it (vLLM first)
            if other != field and request.get(other) is not None:
                request[other] = per_choice
                absent = False  # changed beyond the member: re-encoded
        if not absent or field not in _MEMBERS:
            return per_choice, None
        return per_choice, _MEMBERS[field].get(per_choice) or _member(field, per_choice)
    bound = 0
    for field in api.output_fields:
        value = request.get(field)
        if type(value) is int and value > 0:
            if per_choice < value:
                request[field] = value = per_choice
            bound = bound or value
        elif value is not None:  # "100000" or 1e5 beside an int bound: a lax server reads it as a bound too
            request[field] = min(named, per_choice)
    return bound, None


_COUNTED = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens", *CHOICES))


def case_variant(request: dict[str, Any]) -> str | None:
    """A member named like an output bound or a choice count but for case (``MAX_TOKENS``, ``N``, or a Unicode
    fold such as the Kelvin sign in ``max_to\u212aens``), or None. Go's encoding/json (Ollama, LocalAI) matches
    names ignoring case and keeps the last: it would generate a bound keyplane neither counted nor lowered."""
    names = "\0".join(request)
    if names.isascii() and names.islower():  # the usual request, checked in C: no name folds to another
        return None
    for name in request:
        folded = name.casefold()
        if folded != name and folded in _COUNTED:
            return name
    return None


def odd_bound(fields: tuple[str, ...], request: dict[str, Any]) -> bool:
    """Does the request name an output bound that is neither null nor a positive int (``"100000"``, ``1e5``,
    ``0``, ``true``)? Beside an int bound it is no bound to keyplane, but many servers read it as one (vLLM takes
    ``max_completion_tokens`` over ``max_tokens``): it is set to the granted bound (:func:`apply_allowance`)."""
    for field in fields:
        value = request.get(field)
        if value is not None and not (type(value) is int and value > 0):
            return True
    return False


def splice(body: bytes, member: bytes) -> bytes | None:
    """``body`` (a JSON object with at least one member: the request's model) with ``member`` (from
    :func:`apply_allowance`) inserted right after its opening brace, the rest byte for byte as sent; None when
    the body does not start with ``{`` (after JSON whitespace): then the request is re-encoded."""
    if body[:1] == b"{":
        return b"{" + member + body[1:]
    start = len(body) - len(body.lstrip(b" \t\r\n"))
    if body[start:start + 1] != b"{":
        return None
    return body[:start + 1] + member + body[start + 1:]
