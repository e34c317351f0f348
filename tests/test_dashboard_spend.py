"""The key page's "Spend now" panel in a real browser: settled vs reserved spend in each window (issue 17)."""

from __future__ import annotations

import httpx
import pytest
from playwright.async_api import BrowserContext, expect

from keyplane.app import KeyplaneApp
from keyplane.domain.policy import Limits
from keyplane.runtime.spend import Ask, Grant
from tests.conftest import bearer, create_key, create_sa
from tests.test_dashboard import browser, context, demo_app, settled, shot, sign_in, site  # noqa: F401

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # the UI is the same on every store


async def test_the_key_page_shows_settled_and_reserved_spend(context: BrowserContext,  # noqa: F811
                                                              demo_app: KeyplaneApp, site: str) -> None:  # noqa: F811
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    admin = bearer(demo_app.bootstrap.admin_token)
    async with httpx.AsyncClient(base_url=site) as rest:
        resp = await rest.post("/api/v1/limit-profiles", headers=admin, json={
            "name": "budgeted", "tokens_per_minute": 50_000, "budget_per_month_usd": 2.0})
        assert resp.status_code == 201, resp.text
        key, _ = await create_key(rest, admin, name="budgeted-app", limit_profile="budgeted")
        _, reader = await create_sa(rest, admin, ["virtual_keys:read"])
    limits = Limits(tokens_per_minute=50_000, budget_per_month_usd=2.0)
    await demo_app.kp.spend.add((key["id"],), 1200, 0.25)  # answers settled
    held = await demo_app.kp.spend.reserve(((key["id"], limits),), Ask(100, 0.0, 1000, 0.0005, True), key["id"])
    assert isinstance(held, Grant)  # a request in flight holds $0.50 and 1,100 tokens

    page = await context.new_page()
    await sign_in(page, demo_app.bootstrap.admin_token)
    await page.goto(f"/ui/keys/{key['id']}")
    panel = page.get_by_role("region", name="Spend now")
    await expect(panel).to_be_visible()
    month = panel.locator("tr[data-window=budget_per_month_usd]")
    await expect(month).to_contain_text("Budget this month (UTC)")
    assert [await c.inner_text() for c in await month.locator("td").all()][:4] == ["$2.00", "$0.25", "$0.50",
                                                                                  "$1.25"]
    tokens = panel.locator("tr[data-window=tokens_per_minute]")
    assert [await c.inner_text() for c in await tokens.locator("td").all()][:4] == ["50,000", "1,200", "1,100",
                                                                                   "47,700"]
    await expect(panel.locator("tr[data-window=cost_per_day_usd] td").first).to_have_text("no limit")
    await shot(page, "key-spend-panel")

    # The request settles; Refresh shows it without reloading the page.
    await demo_app.kp.spend.settle(held, (key["id"],), 300, 0.1)
    await panel.get_by_role("button", name="Refresh").click()
    await settled(page)
    month = page.get_by_role("region", name="Spend now").locator("tr[data-window=budget_per_month_usd] td")
    await expect(month.nth(1)).to_have_text("$0.35")
    await expect(month.nth(2)).to_have_text("$0.00")

    # A token without usage:read sees no panel, and its fragment is refused.
    await context.clear_cookies()
    await sign_in(page, reader)
    await page.goto(f"/ui/keys/{key['id']}")
    await expect(page.get_by_role("heading", name="budgeted-app", level=1)).to_be_visible()
    await expect(page.get_by_role("region", name="Spend now")).to_have_count(0)
    refused = await page.request.get(f"/ui/keys/{key['id']}/spend")
    assert refused.status == 403
