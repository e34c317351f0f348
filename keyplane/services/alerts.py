"""Alerts: budget thresholds, error rates and request spikes, delivered as signed webhooks with retries.

Every firing is recorded in the audit log (principal ``system``, action ``alert.fire``) before the
webhook is sent. A rule fires at most once per cooldown, also across processes: the firing is claimed
with a conditional UPDATE that only one writer can win. The outcome of each delivery (delivered, or
failed after every attempt) is stored on the rule (``last_delivery``), and a failed one is also
audited (``alert.delivery_failed``), so a lost alert is visible after a restart.

A rule on a key watches that key's traffic as ``traffic.key_ids`` defines it: with its sub-keys.

What ``observed.value`` is, per kind (``observed.value_is`` says it in the payload too):
  budget      spent ÷ limit (a fraction of the key's cost/day or budget/month)
  error_rate  (refused + failed) ÷ requests in the window (a fraction)
  spike       requests in the window ÷ max(baseline, 1): the baseline is the mean number of requests per
              window over the 24 hours before it, floored at 1 so that a key with (almost) no history
              does not fire on its first few requests; ``baseline_floored`` says when the floor applied
              (then ``value`` equals the request count).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
from sqlalchemy import or_, select, update

from keyplane.domain.errors import invalid_request, not_found
from keyplane.domain.secrets_box import SecretBox
from keyplane.services import audit, traffic
from keyplane.services.limit_profiles import limits_of
from keyplane.services.principal import Principal, new_id, system
from keyplane.services.schemas import AlertRuleCreate
from keyplane.services.usage import UsageService
from keyplane.store import rollups
from keyplane.store.db import Database
from keyplane.store.models import AlertRule, LimitProfile, VirtualKey

log = logging.getLogger("keyplane.alerts")


@dataclass(slots=True)
class Delivery:
    """How one webhook delivery went: the attempts made and, unless delivered, the last error (no URL, no body)."""

    delivered: bool = False
    attempts: int = 0
    error: str | None = None


def webhook_host(url: str) -> str:
    """Where a webhook goes, for people and the audit log: host and port, never a path or user:password
    (either may carry a token, as Slack and Teams URLs do)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def rule_to_dict(r: AlertRule) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "kind": r.kind, "key_id": r.key_id, "mcp_server": r.mcp_server,
            "threshold": r.threshold,
            "window_minutes": r.window_minutes, "min_requests": r.min_requests, "webhook_url": r.webhook_url,
            "cooldown_seconds": r.cooldown_seconds, "enabled": r.enabled, "last_fired_at": r.last_fired_at,
            "last_delivery": None if r.last_delivery_status is None else {
                "status": r.last_delivery_status, "at": r.last_delivery_at, "attempts": r.last_delivery_attempts,
                "error": r.last_delivery_error},
            "created_at": r.created_at}


SPIKE_BASELINE_FLOOR = 1.0
"""A spike's baseline is at least one request per window (see the module docstring)."""


class AlertService:
    def __init__(self, db: Database, usage: UsageService, box: Callable[[], SecretBox],
                 retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0)) -> None:
        self.db = db
        self.usage = usage
        self.box = box
        self.retry_delays = retry_delays
        self.deliveries: set[asyncio.Task[bool]] = set()
        self.delivered = 0
        self.failed = 0

    # -- rules -----------------------------------------------------------------------------------

    async def create(self, principal: Principal, data: AlertRuleCreate) -> tuple[dict[str, Any], str]:
        principal.require("usage:read")
        principal.require("limit_profiles:write")
        secret = "whsec_" + secrets.token_urlsafe(32)
        async with self.db.write() as s:
            if data.key_id is not None:
                key = (await s.execute(select(VirtualKey).where(
                    VirtualKey.id == data.key_id, VirtualKey.org_id == principal.org_id,
                    VirtualKey.status != "deleted"))).scalar_one_or_none()
                if key is None:
                    raise not_found("key", data.key_id)
            if data.kind == "budget":
                if data.mcp_server is not None:
                    raise invalid_request("A budget alert watches a key's spend, not an MCP server",
                                          param="mcp_server")
                if data.key_id is None:
                    raise invalid_request("A budget alert watches one key: give key_id", param="key_id")
                profile = (await s.execute(select(LimitProfile).where(
                    LimitProfile.id == key.limit_profile_id))).scalar_one_or_none()
                limits = limits_of(profile)
                if limits.budget_per_month_usd is None and limits.cost_per_day_usd is None:
                    raise invalid_request("That key's limit profile has no cost_per_day_usd or budget_per_month_usd",
                                          param="key_id")
            if data.kind == "error_rate" and data.threshold > 1:
                raise invalid_request("An error-rate threshold is a fraction (0.2 = 20%)", param="threshold")
            if (await s.execute(select(AlertRule.id).where(AlertRule.org_id == principal.org_id,
                                                           AlertRule.name == data.name))).first():
                from keyplane.domain.errors import conflict

                raise conflict(f"An alert rule named '{data.name}' already exists")
            rule = AlertRule(id=new_id("alr"), org_id=principal.org_id, **data.model_dump(), secret_sealed="")
            rule.secret_sealed = self.box().seal(secret, rule.id)
            s.add(rule)
            await s.flush()
            await audit.append(s, principal, "alert_rule.create", rule.id,
                               {k: v for k, v in data.model_dump().items() if k != "webhook_url"}
                               | {"webhook_host": webhook_host(data.webhook_url)})
            return rule_to_dict(rule), secret

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        principal.require("usage:read")
        async with self.db.read() as s:
            q = select(AlertRule).where(AlertRule.org_id == principal.org_id).order_by(AlertRule.pk)
            return [rule_to_dict(r) for r in (await s.execute(q)).scalars()]

    async def delete(self, principal: Principal, rule_id: str) -> None:
        principal.require("limit_profiles:write")
        async with self.db.write() as s:
            rule = (await s.execute(select(AlertRule).where(AlertRule.id == rule_id,
                                                            AlertRule.org_id == principal.org_id))).scalar_one_or_none()
            if rule is None:
                raise not_found("alert rule", rule_id)
            await audit.append(s, principal, "alert_rule.delete", rule.id, {"name": rule.name})
            await s.delete(rule)

    # -- evaluation ------------------------------------------------------------------------------

    async def _count(self, rule: AlertRule, start: datetime, end: datetime) -> tuple[int, int]:
        """Requests and errors in ``[start, end)`` from the minute rollups (the rule's key's traffic, as
        ``traffic.key_ids`` defines it, and its MCP server, when it names them): both ends move up to the
        next minute, so back-to-back windows stay disjoint and the current minute counts (also in its first
        second: ``end`` on a minute boundary still takes the minute it starts)."""
        lo = rollups.ceil_to(int(start.timestamp()) + 1, rollups.MINUTE)
        hi = rollups.ceil_to(int(end.timestamp()) + 1, rollups.MINUTE)
        ids: list[str] | None = None
        if rule.key_id:
            async with self.db.read() as s:
                ids = await traffic.key_ids(s, rule.org_id, rule.key_id)
        return await self.db.run_read(
            lambda s: rollups.counts(s.connection(), rule.org_id, lo, hi, ids, rule.mcp_server or None))

    async def _condition(self, rule: AlertRule, now: datetime) -> dict[str, Any] | None:
        """What was observed, when the rule's condition holds; None otherwise."""
        window = timedelta(minutes=rule.window_minutes)
        if rule.kind == "budget":
            async with self.db.read() as s:
                profile = (await s.execute(select(LimitProfile).join(
                    VirtualKey, VirtualKey.limit_profile_id == LimitProfile.id).where(
                    VirtualKey.id == rule.key_id))).scalar_one_or_none()
            limits = limits_of(profile)
            day, month = await self.usage.spent_so_far(rule.key_id or "")
            for name, spent, limit in (("budget_per_month_usd", month, limits.budget_per_month_usd),
                                       ("cost_per_day_usd", day, limits.cost_per_day_usd)):
                if limit and spent / limit >= rule.threshold:
                    return {"limit": name, "limit_usd": limit, "spent_usd": round(spent, 6),
                            "value": round(spent / limit, 4), "value_is": "spent_usd / limit_usd"}
            return None
        total, errors = await self._count(rule, now - window, now)
        if total < rule.min_requests:
            return None
        if rule.kind == "error_rate":
            rate = errors / total
            if rate < rule.threshold:
                return None
            return {"requests": total, "errors": errors, "value": round(rate, 4), "value_is": "errors / requests"}
        baseline_total, _ = await self._count(rule, now - window - timedelta(hours=24), now - window)
        baseline = baseline_total / (24 * 60 / rule.window_minutes)
        used = max(baseline, SPIKE_BASELINE_FLOOR)
        factor = total / used
        if factor >= rule.threshold:
            return {"requests": total, "baseline_requests_per_window": round(baseline, 3),
                    "baseline_used": round(used, 3), "baseline_floored": baseline < SPIKE_BASELINE_FLOOR,
                    "value": round(factor, 3), "value_is": "requests / baseline_used"}
        return None

    async def evaluate(self, now: datetime | None = None) -> list[str]:
        """Check every enabled rule; fire those whose condition holds and whose cooldown has passed."""
        now = now or datetime.now(UTC)
        async with self.db.read() as s:
            rules = list((await s.execute(select(AlertRule).where(AlertRule.enabled.is_(True)))).scalars())
        fired = []
        for rule in rules:
            if rule.last_fired_at and now - rule.last_fired_at < timedelta(seconds=rule.cooldown_seconds):
                continue
            observed = await self._condition(rule, now)
            if observed is not None and await self._fire(rule, observed, now):
                fired.append(rule.id)
        return fired

    async def _fire(self, rule: AlertRule, observed: dict[str, Any], now: datetime) -> bool:
        cutoff = now - timedelta(seconds=rule.cooldown_seconds)
        payload = {"type": "keyplane.alert", "rule_id": rule.id, "rule": rule.name, "kind": rule.kind,
                   "key_id": rule.key_id, "mcp_server": rule.mcp_server, "threshold": rule.threshold,
                   "observed": observed,
                   "fired_at": audit.rfc3339(now)}
        async with self.db.write() as s:
            claimed = await s.execute(update(AlertRule).where(
                AlertRule.id == rule.id,
                or_(AlertRule.last_fired_at.is_(None), AlertRule.last_fired_at <= cutoff),
            ).values(last_fired_at=now))
            if claimed.rowcount != 1:
                return False  # another process fired it
            await audit.append(s, system(rule.org_id), "alert.fire", rule.id,
                               {"rule": rule.name, "kind": rule.kind, "key_id": rule.key_id, "observed": observed})
        secret = self.box().open(rule.secret_sealed, rule.id)
        task = asyncio.create_task(self._deliver_and_record(rule, secret, payload))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)
        return True

    async def _deliver_and_record(self, rule: AlertRule, secret: str, payload: dict[str, Any]) -> bool:
        outcome = Delivery()
        delivered = await self.deliver(rule.webhook_url, secret, payload, outcome)
        try:
            await self._record_delivery(rule, outcome)
        except Exception:
            log.exception("could not record the delivery state of alert %s", rule.id)
        return delivered

    async def _record_delivery(self, rule: AlertRule, outcome: Delivery) -> None:
        now = datetime.now(UTC)
        async with self.db.write() as s:
            await s.execute(update(AlertRule).where(AlertRule.id == rule.id).values(
                last_delivery_status="delivered" if outcome.delivered else "failed", last_delivery_at=now,
                last_delivery_attempts=outcome.attempts, last_delivery_error=outcome.error))
            if not outcome.delivered:
                await audit.append(s, system(rule.org_id), "alert.delivery_failed", rule.id, {
                    "rule": rule.name, "attempts": outcome.attempts, "error": outcome.error,
                    "webhook_host": webhook_host(rule.webhook_url)})

    async def deliver(self, url: str, secret: str, payload: dict[str, Any], outcome: Delivery | None = None) -> bool:
        """POST the signed payload, retrying with backoff; ``outcome`` (if given) says how it went."""
        outcome = outcome if outcome is not None else Delivery()
        body = orjson.dumps(payload)
        import aiohttp  # only when a webhook is due: keeps the CLI's start-up light

        async with aiohttp.ClientSession() as session:
            for attempt, delay in enumerate((0.0, *self.retry_delays)):
                if delay:
                    await asyncio.sleep(delay)
                outcome.attempts = attempt + 1
                stamp = str(int(time.time()))
                headers = {"content-type": "application/json", "x-keyplane-timestamp": stamp,
                           "x-keyplane-signature": f"sha256={sign(secret, stamp, body)}",
                           "x-keyplane-attempt": str(attempt + 1)}
                try:
                    async with session.post(url, data=body, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status < 300:
                            self.delivered += 1
                            outcome.delivered, outcome.error = True, None
                            return True
                        outcome.error = f"HTTP {resp.status}"
                        log.warning("alert webhook answered %d (attempt %d)", resp.status, attempt + 1)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome.error = type(exc).__name__
                    log.warning("alert webhook unreachable: %s (attempt %d)", type(exc).__name__, attempt + 1)
        self.failed += 1
        log.error("alert %s not delivered after %d attempts", payload["rule_id"], len(self.retry_delays) + 1)
        return False
