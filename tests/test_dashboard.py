"""The dashboard at /ui in a real browser: headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from keyplane.app import KeyplaneApp
from keyplane.dashboard.session import new_session, open_session, seal
from keyplane.domain import tokens
from tests.conftest import bearer, create_key, create_sa, verify
from tests.processes import free_port, serve

expect.set_options(timeout=10_000)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("KEYPLANE_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
SHOTS = ARTIFACTS / "screenshots"
pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # the UI is the same on every store


def test_chromium_is_installed(backend: str) -> None:
    """`make test` installs Debian's chromium; CI must not silently skip the browser tests."""
    assert Path(CHROMIUM).exists(), "install chromium (apt-get install chromium): make test does"


@pytest.fixture
async def demo_app(settings_factory: Any) -> AsyncIterator[KeyplaneApp]:
    # The demo provider forwards to keyplane's own /_demo endpoint: it must know the real port.
    application = KeyplaneApp(settings_factory(demo=True, port=free_port()))
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def site(demo_app: KeyplaneApp) -> AsyncIterator[str]:
    async with serve(demo_app, port=demo_app.settings.port) as base:
        yield base


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser, site: str) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, base_url=site)
    ctx.set_default_timeout(10_000)
    await ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=site)
    yield ctx
    await ctx.close()


async def shot(page: Page, name: str, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


async def sign_in(page: Page, token: str) -> None:
    await page.goto("/ui/keys")
    await expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fkeys"))
    await page.get_by_label("Service-account token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/ui/keys$"))


async def settled(page: Page) -> None:
    """htmx has finished swapping and wiring up new content (so the next event reaches it)."""
    busy = "() => !window.htmx || !!document.querySelector('.htmx-request,.htmx-swapping,.htmx-settling,.htmx-added')"
    for _ in range(200):  # polled with evaluate: wait_for_function would need 'unsafe-eval', which the CSP forbids
        if not await page.evaluate(busy):
            break
        await page.wait_for_timeout(25)
    await page.wait_for_timeout(50)


async def unlabeled_fields(page: Page) -> list[str]:
    return await page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]),select,textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.name)""")


async def test_keys_connect_usage_and_audit_end_to_end(context: BrowserContext, demo_app: KeyplaneApp,
                                                       site: str) -> None:
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    admin = demo_app.bootstrap.admin_token
    page = await context.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    await page.goto("/ui/login")
    await shot(page, "01-sign-in")
    await sign_in(page, admin)
    assert await unlabeled_fields(page) == []

    # Create a key; its secret is shown once, with a copy button.
    await page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog", name="Create key")
    await dialog.get_by_label("Name").fill("web-app")
    await dialog.get_by_label("Cost center").fill("web")
    await dialog.get_by_label("Environment").fill("production")
    await dialog.get_by_label("Limit profile").select_option("professional")
    await dialog.get_by_label("Metadata (key=value, one per line)").fill("team=storefront")
    await dialog.get_by_role("button", name="Create key").click()
    created = page.get_by_role("dialog", name=re.compile("Key created"))
    await expect(created).to_be_visible()
    await expect(created).to_contain_text("You will not see it again")
    secret = (await page.locator("#new-secret").inner_text()).strip()
    assert tokens.is_well_formed(secret, tokens.VIRTUAL_KEY_PREFIX)
    await shot(page, "03-key-created")
    await created.get_by_role("button", name="Copy secret").click()
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    await created.get_by_role("link", name="Done").click()
    assert secret not in await page.content()  # never shown again

    async with httpx.AsyncClient(base_url=site) as rest:
        admin_h = bearer(admin)
        assert (await verify(rest, admin_h, secret))["valid"] is True

        # Rename inline.
        card = page.locator("article.key-card", has_text="web-app")
        await card.get_by_role("button", name="Rename web-app").click()
        await card.get_by_label("New name").fill("web-app-2")
        await card.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("button", name="Rename web-app-2")).to_be_visible()
        card = page.locator("article.key-card", has_text="web-app-2")
        keys = (await rest.get("/api/v1/keys", headers=admin_h)).json()["data"]
        key_id = next(k["id"] for k in keys if k["name"] == "web-app-2")

        # Disable, then re-enable: immediate, and the card moves to its section without a reload.
        toggle = card.get_by_role("switch", name="web-app-2 enabled")
        assert await toggle.evaluate("b => getComputedStyle(b.querySelector('.knob')).borderRadius") == "50%"
        await expect(page.get_by_test_id("enabled-count")).to_have_text("1")
        await page.evaluate("window.notReloaded = true")
        await toggle.click()
        await expect(page.locator("#disabled-list article.key-card", has_text="web-app-2")).to_be_visible()
        await expect(page.locator("#enabled-list article.key-card")).to_have_count(0)
        await expect(page.get_by_test_id("enabled-count")).to_have_text("0")
        await expect(page.get_by_test_id("disabled-count")).to_have_text("1")
        await expect(card.get_by_role("switch")).to_have_text("Disabled")
        await expect(card.get_by_role("switch")).to_have_attribute("aria-checked", "false")
        assert await page.evaluate("window.notReloaded") is True
        assert (await verify(rest, admin_h, secret))["code"] == "DISABLED"
        await card.get_by_role("switch").click()
        await expect(page.locator("#enabled-list article.key-card", has_text="web-app-2")).to_be_visible()
        await expect(page.get_by_test_id("enabled-count")).to_have_text("1")
        await expect(card.get_by_role("switch")).to_have_text("Enabled")
        assert (await verify(rest, admin_h, secret))["valid"] is True

        # A proxied request through the demo provider: usage shows it.
        chat = await rest.post("/v1/chat/completions", headers=bearer(secret),
                               json={"model": "echo-1", "messages": [{"role": "user", "content": "hello"}]})
        assert chat.status_code == 200
        await demo_app.kp.flush_usage()
        await demo_app.kp.flush()
        await page.goto("/ui/usage")
        await expect(page.locator("table.data").first).to_contain_text("echo-1")
        await expect(page.locator("#top-keys")).to_contain_text("web-app-2")
        assert await page.locator("svg.chart").count() >= 5
        # Costs read as money ($0.000005), never 5e-06; chart labels are drawn at 13 px, not shrunk to ~10.
        await expect(page.locator("#top-keys")).to_contain_text("$0.000005")
        assert "e-0" not in await page.locator("main").inner_text()
        await expect(page.get_by_role("img", name="Cost by model (USD)")).to_contain_text("$0.000005")
        sizes = await page.evaluate("() => [...document.querySelectorAll('svg.chart text.tick')]"
                                    ".map(t => t.getBoundingClientRect().height)")
        assert sizes and min(sizes) >= 12, sizes
        await shot(page, "06-usage")

        # The key's own page: rename, disable, rotate and delete are there too.
        await page.goto(f"/ui/keys/{key_id}")
        await expect(page.locator("#by-model")).to_contain_text("echo-1")
        detail = page.locator("article.key-card")
        for name in ("Rename web-app-2", "Rotate", "Delete"):
            await expect(detail.get_by_role("button", name=name)).to_be_visible()
        await shot(page, "05-key-detail")
        await detail.get_by_role("switch", name="web-app-2 enabled").click()
        await expect(detail.get_by_role("switch")).to_have_text("Disabled")
        await expect(page).to_have_url(re.compile(rf"/ui/keys/{key_id}$"))  # stayed on the key's page
        assert (await verify(rest, admin_h, secret))["code"] == "DISABLED"
        await detail.get_by_role("switch").click()
        await expect(detail.get_by_role("switch")).to_have_text("Enabled")

        # The connect helper: every client's method, then a minted token filled in.
        await page.goto("/ui/keys")
        await shot(page, "02-keys")
        panel = page.locator(".connect-card")
        select = panel.get_by_label("Client")
        await expect(select).to_be_visible()
        await settled(page)
        expected = {
            "claude-code": r'^claude mcp add --transport http keyplane http://127\.0\.0\.1:\d+/mcp '
                           r'--header "Authorization: Bearer \$KEYPLANE_MCP_TOKEN"$',
            "codex": r"^codex mcp add keyplane --url http://127\.0\.0\.1:\d+/mcp --bearer-token-env-var "
                     r"KEYPLANE_MCP_TOKEN$",
            "vscode": r'"promptString"[\s\S]*"Bearer \$\{input:keyplane-token\}"',
            "cursor": r"^cursor://anysphere\.cursor-deeplink/mcp/install\?name=keyplane&config=[A-Za-z0-9%]+$",
        }
        kinds = {"claude-code": "command", "codex": "command", "vscode": "json", "cursor": "link"}
        for client, pattern in expected.items():
            async with page.expect_response(re.compile(rf"/ui/connect\?client={client}$")):
                await panel.get_by_label("Client").select_option(client)
            await expect(panel.locator(f"#client-{client}")).to_be_visible()  # the helper was re-rendered
            await settled(page)
            snippet = panel.get_by_test_id(f"snippet-{kinds[client]}")
            if client == "codex":
                snippet = snippet.nth(1)  # after `export …`
            await expect(snippet.first).to_have_text(re.compile(pattern))
            if client == "cursor":  # the "Add to Cursor" button is the same deeplink
                await expect(panel.get_by_test_id("add-link")).to_have_attribute("href", re.compile(pattern))
        # Connector clients connect from their vendor's cloud: on a loopback URL the helper says what is
        # needed instead of a URL that cannot work, and offers no token to mint.
        for client in ("claude-desktop", "chatgpt"):
            async with page.expect_response(re.compile(rf"/ui/connect\?client={client}$")):
                await panel.get_by_label("Client").select_option(client)
            await expect(panel.locator(f"#client-{client}")).to_be_visible()
            await settled(page)
            await expect(panel.get_by_test_id("connect-needs")).to_contain_text("public HTTPS URL")
            await expect(panel.get_by_test_id("connect-needs")).to_contain_text("KEYPLANE_MCP_QUERY_TOKEN=true")
            await expect(panel.locator("[data-testid^=snippet-]")).to_have_count(0)
            await expect(panel.get_by_role("button", name=re.compile("Mint an agent token"))).to_have_count(0)
        async with page.expect_response(re.compile(r"/ui/connect\?client=claude-code$")):
            await panel.get_by_label("Client").select_option("claude-code")
        await expect(panel.locator("#client-claude-code")).to_be_visible()
        await settled(page)
        # Code never wraps in the middle of a word: long lines scroll.
        assert await panel.locator("pre").first.evaluate("p => getComputedStyle(p).whiteSpace") == "pre"
        await panel.get_by_role("button", name=re.compile("Mint an agent token")).click()
        command = panel.get_by_test_id("snippet-command")
        await expect(command).to_contain_text("mcp_sa_")
        minted = re.search(r"mcp_sa_[0-9A-Za-z]{32}", await command.inner_text()).group(0)  # type: ignore[union-attr]
        who = await rest.get("/api/v1/whoami", headers=bearer(minted))
        assert who.status_code == 200 and "virtual_keys:create" in who.json()["scopes"]
        await shot(page, "04-connect-helper")

        # Delete: the dialog warns that the key was used in the last 24 hours.
        await page.reload()
        card = page.locator("article.key-card", has_text="web-app-2")
        await expect(card.locator(".last-used")).not_to_have_text("never")
        await card.get_by_role("button", name="Delete").click()
        confirm = page.get_by_role("dialog", name=re.compile("Delete “web-app-2”"))
        await expect(confirm).to_contain_text("This key was used")
        await shot(page, "07-delete-warning", full_page=False)
        await confirm.get_by_role("button", name="Delete key").click()
        await expect(page.locator("article.key-card", has_text="web-app-2")).to_have_count(0)
        assert (await verify(rest, admin_h, secret))["valid"] is False

        # The audit trail, with the chain's verdict in plain words.
        await page.goto("/ui/audit")
        await expect(page.get_by_test_id("chain-status")).to_contain_text("Chain verified")
        # Principals by name, as the header names the signed-in one ("admin"), with the id on hover.
        first_principal = page.locator("table.audit tbody tr td:nth-child(3) a").first
        await expect(first_principal).to_have_text("admin")
        await expect(first_principal).to_have_attribute("title", re.compile(r"^sa_"))
        for action in ("virtual_key.create", "virtual_key.update", "virtual_key.disable", "virtual_key.delete"):
            await expect(page.locator("table.audit")).to_contain_text(action)
        await page.get_by_role("textbox", name="Action").fill("virtual_key.update")
        await page.get_by_role("button", name="Filter").click()
        await expect(page.locator("table.audit tbody tr")).to_have_count(1)
        await page.goto("/ui/audit")
        # The trail as a picture: changes per day and the most frequent actions, with the numbers as a table.
        await expect(page.get_by_role("img", name="Changes recorded per day, last 14 days (UTC)")).to_be_visible()
        await expect(page.get_by_role("img", name="Most frequent actions, last 14 days")).to_contain_text(
            "virtual_key.create")
        await shot(page, "08-audit")
        total = (await rest.get("/api/v1/audit/verify", headers=admin_h)).json()["entries"]
        await page.get_by_text("Changes per day as a table").click()
        rows = page.get_by_test_id("activity-table").locator("tbody tr")
        await expect(rows).to_have_count(14)
        counts = await rows.locator("td:nth-child(2)").all_inner_texts()
        assert sum(int(c) for c in counts) == total  # every change this test made, drawn on its day

        for path, name in (("/ui/service-accounts", "09-service-accounts"),
                           ("/ui/limit-profiles", "10-limit-profiles"), ("/ui/providers", "11-providers"),
                           ("/ui/alerts", "13-alerts")):
            await page.goto(path)
            assert await unlabeled_fields(page) == []
            await shot(page, name)

        # Phone width: readable, nothing wider than the screen.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.goto("/ui/keys")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 392
        await shot(page, "12-keys-phone")

        assert violations == []  # the pages need nothing the policy forbids

        # A favicon on every page, and the bare address leads to the dashboard.
        assert (await rest.get("/favicon.ico")).headers["content-type"] == "image/svg+xml"
        icon = await page.locator("link[rel=icon]").get_attribute("href")
        assert icon and (await rest.get(icon)).status_code == 200
        await page.goto("/")
        await expect(page).to_have_url(re.compile(r"/ui/keys$"))

        # Sign out ends the session.
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.get_by_role("button", name="Sign out").click()
        await expect(page).to_have_url(re.compile(r"/ui/login"))
        await page.goto("/ui/keys")
        await expect(page).to_have_url(re.compile(r"/ui/login"))


async def test_changes_without_the_csrf_token_are_refused(context: BrowserContext, demo_app: KeyplaneApp,
                                                          site: str) -> None:
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    page = await context.new_page()
    await sign_in(page, demo_app.bootstrap.admin_token)
    # The browser's own cookie, no CSRF token: refused, and nothing was created.
    resp = await page.request.post(f"{site}/ui/keys", form={"name": "forged"})
    assert resp.status == 403 and "csrf_failed" in await resp.text()
    resp = await page.request.post(f"{site}/ui/keys", form={"name": "forged", "csrf": "wrong"})
    assert resp.status == 403
    async with httpx.AsyncClient(base_url=site) as rest:
        keys = (await rest.get("/api/v1/keys", headers=bearer(demo_app.bootstrap.admin_token))).json()["data"]
    assert [k for k in keys if k["name"] == "forged"] == []
    # Pages forbid framing and foreign scripts, and are never cached (they may show a secret once).
    page_resp = await page.request.get(f"{site}/ui/keys")
    assert "frame-ancestors 'none'" in page_resp.headers["content-security-policy"]
    assert page_resp.headers["cache-control"] == "no-store"
    # The cookie is HttpOnly and SameSite=Strict.
    cookie = next(c for c in await context.cookies() if c["name"] == "keyplane_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert demo_app.bootstrap.admin_token not in cookie["value"]


async def test_what_the_token_cannot_do_is_not_offered_and_is_refused_if_forced(
        context: BrowserContext, demo_app: KeyplaneApp, site: str) -> None:
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    async with httpx.AsyncClient(base_url=site) as rest:
        admin_h = bearer(demo_app.bootstrap.admin_token)
        await create_key(rest, admin_h, name="existing")
        sa, reader = await create_sa(rest, admin_h, ["virtual_keys:read"], name="reader")
        page = await context.new_page()
        await sign_in(page, reader)
        await expect(page.locator("article.key-card", has_text="existing")).to_be_visible()
        assert await page.get_by_role("button", name="Create key").count() == 0
        assert await page.get_by_role("switch").count() == 0
        assert await page.get_by_role("link", name="Usage", exact=True).count() == 0
        assert await page.get_by_role("link", name="Service accounts", exact=True).count() == 0
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        forced = await page.request.post(f"{site}/ui/keys", form={"name": "forced", "csrf": csrf or ""})
        assert forced.status == 403 and "insufficient_scope" in await forced.text()
        forced = await page.request.get(f"{site}/ui/service-accounts")
        assert forced.status == 403
        # Revoking the token ends its sessions at once.
        await rest.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin_h)
        await page.goto("/ui/keys")
        await expect(page).to_have_url(re.compile(r"/ui/login"))


def test_sessions_expire_and_cannot_be_forged(app: KeyplaneApp, backend: str) -> None:
    box = app.kp.secret_box()
    live = seal(box, new_session("mcp_sa_x"))
    assert open_session(box, live) is not None
    assert open_session(box, seal(box, new_session("mcp_sa_x", lifetime=-1))) is None  # expired
    assert open_session(box, live[:-4] + "AAAA") is None  # tampered
    assert open_session(box, "not-a-cookie") is None
    assert open_session(box, None) is None


async def test_accounts_profiles_and_providers_pages(context: BrowserContext, demo_app: KeyplaneApp,
                                                     site: str) -> None:
    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    page = await context.new_page()
    await sign_in(page, demo_app.bootstrap.admin_token)

    # A service account with scope checkboxes; its token once; then revoked.
    await page.goto("/ui/service-accounts")
    form = page.locator("form", has=page.get_by_role("heading", name="New service account"))
    await form.get_by_label("Name").fill("ci-bot")
    await form.get_by_label("virtual_keys:read").check()
    await form.get_by_label("usage:read").check()
    await form.get_by_role("button", name="Create service account").click()
    await expect(page.get_by_text("You will not see it again")).to_be_visible()
    token = (await page.locator("#sa-token").inner_text()).strip()
    async with httpx.AsyncClient(base_url=site) as rest:
        who = (await rest.get("/api/v1/whoami", headers=bearer(token))).json()
        assert who["name"] == "ci-bot" and set(who["scopes"]) == {"virtual_keys:read", "usage:read"}
        page.once("dialog", lambda d: d.accept())  # the revoke confirmation
        row = page.locator("tr", has_text="ci-bot")
        await row.get_by_role("button", name="Revoke").click()
        await expect(page.locator("tr", has_text="ci-bot")).to_contain_text("revoked")
        assert (await rest.get("/api/v1/whoami", headers=bearer(token))).status_code == 401

        # A limit profile; a bad number is a clear error, not a crash.
        await page.goto("/ui/limit-profiles")
        await page.get_by_label("Name (lower case, digits, - and _)").fill("batch")
        await page.get_by_label("Requests per minute").fill("lots")
        await page.get_by_role("button", name="Create profile").click()
        await expect(page.get_by_role("alert")).to_contain_text("requests_per_minute")
        await page.get_by_label("Name (lower case, digits, - and _)").fill("batch")
        await page.get_by_label("Requests per minute").fill("120")
        await page.get_by_role("button", name="Create profile").click()
        await expect(page.locator("tr", has_text="batch")).to_contain_text("120")

        # A provider: prices per model, the secret write-only.
        await page.goto("/ui/providers")
        add = page.locator("form", has=page.get_by_role("heading",
                                                        name="Add a provider (OpenAI-compatible or Anthropic)"))
        models = add.get_by_label("Models: one per line, name then input and output price in USD per million "
                                  "tokens (prices optional)")

        async def fill_provider(model_lines: str) -> None:
            await add.get_by_label("Name", exact=True).fill("local")
            await add.get_by_label("Base URL").fill("http://127.0.0.1:9/v1")
            await add.get_by_label("API key (write-only: sealed at rest, never shown again)").fill("sk-very-secret-123")
            await models.fill(model_lines)
            await add.get_by_role("button", name="Add provider").click()

        await fill_provider("m-1 2.5 10\nm-2 x 1")  # a price that is not a number: a clear error
        await expect(page.get_by_role("alert")).to_contain_text("prices are numbers")
        await fill_provider("m-1 2.5 10\nm-2")
        row = page.locator("tr", has_text="local")
        await expect(row).to_contain_text("m-1 $2.5 / $10.0")
        await expect(row).to_contain_text("m-2 $0.0 / $0.0")
        assert "sk-very-secret-123" not in await page.content()
        # An Anthropic provider with prompt-cache prices.
        await add.get_by_label("Name", exact=True).fill("claude")
        await add.get_by_label("Kind").select_option("anthropic")
        await add.get_by_label("Base URL").fill("http://127.0.0.1:9/v1")
        await models.fill("claude-x 3 15 3.75 0.3")
        await add.get_by_role("button", name="Add provider").click()
        claude = page.locator("tr", has_text="claude-x")
        await expect(claude).to_contain_text("anthropic")
        await expect(claude).to_contain_text("claude-x $3.0 / $15.0, cache $3.75 write / $0.3 read")
        # Edit: new prices and a rotated secret (write-only: never shown, only its mask changes).
        admin = bearer(demo_app.bootstrap.admin_token)
        before = (await rest.get("/api/v1/providers/local", headers=admin)).json()["provider"]
        await row.get_by_text("Edit").click()
        await row.get_by_label("Models of local: one per line, name then input and output price").fill("m-1 3")
        await row.get_by_role("button", name="Save local").click()
        await expect(page.get_by_role("alert")).to_contain_text("local: 'm-1 3': write a model as")
        row = page.locator("tr", has_text="local")
        await row.get_by_text("Edit").click()
        await row.get_by_label("Models of local: one per line, name then input and output price").fill("m-1 3 12")
        await row.get_by_label("New API key for local (blank keeps the current one)").fill("sk-rotated-456789")
        await row.get_by_role("button", name="Save local").click()
        await expect(page.locator("tr", has_text="local")).to_contain_text("m-1 $3.0 / $12.0")
        await expect(page.locator("tr", has_text="local")).not_to_contain_text("m-2")
        assert "sk-rotated-456789" not in await page.content()
        after = (await rest.get("/api/v1/providers/local", headers=admin)).json()["provider"]
        assert after["models"] == [{"name": "m-1", "input_per_mtok": 3.0, "output_per_mtok": 12.0}]
        assert after["api_key"] != before["api_key"] and after["api_key"].endswith("6789")
        page.once("dialog", lambda d: d.accept())  # the delete confirmation
        await page.locator("tr", has_text="local").get_by_role("button", name="Delete").click()
        await expect(page.locator("tr", has_text="local")).to_have_count(0)
        listed = (await rest.get("/api/v1/providers", headers=bearer(demo_app.bootstrap.admin_token))).json()
        assert "local" not in {p["name"] for p in listed["data"]} and "demo" in {p["name"] for p in listed["data"]}

        # Alerts: a rule the service refuses is a clear error; a good one shows its signing secret once and
        # only the webhook's host (a webhook URL may carry a token); then it is deleted.
        await page.goto("/ui/alerts")
        new_rule = page.locator("form", has=page.get_by_role("heading", name="New alert rule"))
        await new_rule.get_by_label("Name (lower case, digits, - and _)").fill("spend")
        await new_rule.get_by_label("Fires when").select_option("budget")
        await new_rule.get_by_label("Threshold").fill("0.8")
        await new_rule.get_by_label("Webhook URL").fill("https://hooks.example.com/T000/very-secret-path")
        await new_rule.get_by_role("button", name="Create alert").click()
        await expect(page.get_by_role("alert")).to_contain_text("A budget alert watches one key")
        await new_rule.get_by_label("Name (lower case, digits, - and _)").fill("errors")
        await new_rule.get_by_label("Fires when").select_option("error_rate")
        await new_rule.get_by_label("Threshold").fill("0.2")
        await new_rule.get_by_label("Window in minutes").fill("10")
        await new_rule.get_by_label("Webhook URL").fill("https://hooks.example.com/T000/very-secret-path")
        await new_rule.get_by_role("button", name="Create alert").click()
        await expect(page.get_by_text("You will not see it again")).to_be_visible()
        signing_secret = (await page.locator("#alert-secret").inner_text()).strip()
        assert signing_secret.startswith("whsec_")
        row = page.locator("tr", has_text="errors")
        await expect(row).to_contain_text("errors exceed 20.0% over 10 min")
        await expect(row).to_contain_text("hooks.example.com")
        await expect(row).to_contain_text("the whole organization")
        await page.goto("/ui/alerts")
        assert "very-secret-path" not in await page.content() and signing_secret not in await page.content()
        rules = (await rest.get("/api/v1/alerts", headers=bearer(demo_app.bootstrap.admin_token))).json()["data"]
        assert [(r["name"], r["kind"], r["threshold"], r["window_minutes"]) for r in rules] == [
            ("errors", "error_rate", 0.2, 10)]
        page.once("dialog", lambda d: d.accept())
        await page.locator("tr", has_text="errors").get_by_role("button", name="Delete").click()
        await expect(page.get_by_text("No alert rules yet.")).to_be_visible()


async def test_another_organizations_key_does_not_exist_on_the_dashboard(app: KeyplaneApp, client: httpx.AsyncClient,
                                                                         admin: dict[str, str]) -> None:
    """Signed in to one organization, another's key ids lead nowhere: not shown, not changed."""
    acme = await app.kp.organizations.create("acme")
    assert acme.admin_token
    mine, my_secret = await create_key(client, admin, name="mine")
    signed_in = await client.post("/ui/login", data={"token": acme.admin_token})
    assert signed_in.status_code == 303
    keys_page = await client.get("/ui/keys")
    assert keys_page.status_code == 200 and "mine" not in keys_page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', keys_page.text)
    assert csrf is not None
    assert (await client.get(f"/ui/keys/{mine['id']}")).status_code == 404
    for action, form in (("status", {"enabled": "false"}), ("name", {"name": "taken"}), ("rotate", {}),
                         ("delete", {}), ("subkeys", {"name": "child"})):
        resp = await client.post(f"/ui/keys/{mine['id']}/{action}", data={**form, "csrf": csrf.group(1)})
        assert resp.status_code == 404, (action, resp.status_code)
    usage = await client.get("/ui/usage")
    assert usage.status_code == 200 and mine["id"] not in usage.text
    audit = await client.get("/ui/audit")
    assert audit.status_code == 200 and mine["id"] not in audit.text
    assert (await verify(client, admin, my_secret))["valid"]  # untouched
    keys = (await client.get("/api/v1/keys", headers=admin)).json()["data"]
    assert [(k["name"], k["status"]) for k in keys] == [("mine", "enabled")]


async def test_keys_page_pages_through_every_key_and_says_how_many(context: BrowserContext, demo_app: KeyplaneApp
                                                                   ) -> None:
    from keyplane.services.principal import system
    from keyplane.services.schemas import KeyCreate

    assert demo_app.bootstrap is not None and demo_app.bootstrap.admin_token
    who = system(demo_app.bootstrap.org_id)
    made = [(await demo_app.kp.keys.create(who, KeyCreate(name=f"svc-{i:03d}")))[0] for i in range(63)]
    for key in made[:3]:
        await demo_app.kp.keys.set_status(who, key["id"], enabled=False)
    await demo_app.kp.keys.create_subkey(who, made[-1]["id"], KeyCreate(name="svc-062-child"))
    page = await context.new_page()
    await sign_in(page, demo_app.bootstrap.admin_token)

    await expect(page.get_by_test_id("enabled-count")).to_have_text("60")  # top-level keys; the sub-key nests
    await expect(page.get_by_test_id("disabled-count")).to_have_text("3")
    pager = page.get_by_test_id("enabled-pager")
    await expect(pager).to_contain_text("Showing 50 of 60 enabled keys")
    await expect(page.locator("#enabled-list > article.key-card")).to_have_count(50)
    newest = page.locator("#enabled-list > article.key-card", has_text="svc-062").first
    await expect(newest.locator("section.subkeys")).to_contain_text("svc-062-child")
    await expect(page.get_by_test_id("disabled-pager")).to_have_count(0)  # all three fit: nothing more to say

    await pager.get_by_role("link", name="Next 50 →").click()
    await expect(page.locator("#enabled-list > article.key-card")).to_have_count(10)
    await expect(page.locator("#enabled-list")).to_contain_text("svc-003")
    await expect(page.locator("#enabled-list")).not_to_contain_text("svc-062")
    await expect(page.get_by_test_id("enabled-pager")).to_contain_text("Showing 10 of 60 enabled keys")
    await page.get_by_test_id("enabled-pager").get_by_role("link", name="← First page").click()
    await expect(page.locator("#enabled-list > article.key-card")).to_have_count(50)


async def test_no_agent_token_is_minted_for_a_connector_that_cannot_connect(
        app: KeyplaneApp, client: httpx.AsyncClient, admin_token: str, admin: dict[str, str]) -> None:
    assert (await client.post("/ui/login", data={"token": admin_token})).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', (await client.get("/ui/keys")).text)
    assert csrf is not None
    before = (await client.get("/api/v1/service-accounts", headers=admin)).json()
    assert '"admin"' in str(before).replace("'", '"')  # the listing answered (admin's account is in it)
    resp = await client.post("/ui/connect/mint", data={"client": "chatgpt", "csrf": csrf.group(1)},
                             headers={"HX-Request": "true"})
    assert resp.status_code == 409 and "public HTTPS URL" in resp.text and "mcp_sa_" not in resp.text
    assert (await client.get("/api/v1/service-accounts", headers=admin)).json() == before
