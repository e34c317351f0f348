"""The dashboard's alerts form watches one MCP server, as the alerts API does (issue 14), in Chromium."""

from __future__ import annotations

import httpx
import pytest
from playwright.async_api import BrowserContext, expect

from keyplane.app import KeyplaneApp
from tests.conftest import bearer
from tests.test_dashboard import browser, context, demo_app, sign_in, site  # noqa: F401  (fixtures)

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # the UI is the same on every store


async def test_an_alert_rule_can_watch_one_mcp_server(backend: str, demo_app: KeyplaneApp,  # noqa: F811
                                                      site: str, context: BrowserContext) -> None:  # noqa: F811
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    admin = bearer(demo_app.bootstrap.admin_token)
    async with httpx.AsyncClient(base_url=site) as rest:
        for name in ("files", "tickets"):
            resp = await rest.post("/api/v1/mcp-servers", json={"name": name, "url": "http://127.0.0.1:9/mcp",
                                                                "default_key": False}, headers=admin)
            assert resp.status_code == 201, resp.text
        page = await context.new_page()
        await sign_in(page, demo_app.bootstrap.admin_token)
        await page.goto("/ui/alerts")
        new_rule = page.locator("form", has=page.get_by_role("heading", name="New alert rule"))
        server = new_rule.get_by_label("MCP server to watch")
        await expect(server.locator("option")).to_have_count(3)  # every request, files, tickets
        await new_rule.get_by_label("Name (lower case, digits, - and _)").fill("tickets-errors")
        await new_rule.get_by_label("Fires when").select_option("error_rate")
        await server.select_option("tickets")
        await new_rule.get_by_label("Threshold").fill("0.3")
        await new_rule.get_by_label("Webhook URL").fill("https://hooks.example.com/keyplane")
        await new_rule.get_by_role("button", name="Create alert").click()
        await expect(page.get_by_text("You will not see it again")).to_be_visible()
        await expect(page.locator("tr", has_text="tickets-errors")).to_contain_text("requests to MCP server tickets")
        rules = (await rest.get("/api/v1/alerts", headers=admin)).json()["data"]
        assert [(r["name"], r["mcp_server"]) for r in rules] == [("tickets-errors", "tickets")]

        # The service's rule shows through the form: a budget alert does not watch a server.
        await page.goto("/ui/alerts")
        await new_rule.get_by_label("Name (lower case, digits, - and _)").fill("spend")
        await new_rule.get_by_label("Fires when").select_option("budget")
        await server.select_option("files")
        await new_rule.get_by_label("Threshold").fill("0.8")
        await new_rule.get_by_label("Webhook URL").fill("https://hooks.example.com/keyplane")
        await new_rule.get_by_role("button", name="Create alert").click()
        await expect(page.get_by_role("alert")).to_contain_text("not an MCP server")
