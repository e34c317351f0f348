"""``/docs`` works on a host with no internet: Swagger UI comes from packaged assets, never a CDN."""

from __future__ import annotations

import re

import httpx


async def test_docs_page_loads_everything_from_keyplane_itself(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert not re.search(r"https?://", page.text), "the page refers to another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        resp = await client.get(asset)
        assert resp.status_code == 200 and len(resp.content) > 1000, asset
    assert "'/openapi.json'" in page.text and (await client.get("/openapi.json")).json()["info"]["title"] == "keyplane"
    assert '"validatorUrl": null' in page.text  # no badge fetched from validator.swagger.io


async def test_the_bare_address_leads_to_the_dashboard(client: httpx.AsyncClient) -> None:
    resp = await client.get("/")
    assert resp.status_code == 307 and resp.headers["location"] == "/ui"
    icon = await client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml" and b"<svg" in icon.content


def test_make_serve_says_what_it_is_doing() -> None:
    """`make serve` on a fresh clone: a line before each slow step, and pip not silenced (it shows progress)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent.parent
    plan = subprocess.run(["make", "-n", "-B", "serve", "VENV=/nonexistent-venv"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    install = next(i for i, line in enumerate(plan) if "pip install" in line and "-e ." in line)
    assert any(line.startswith("echo") and "installing keyplane" in line for line in plan[:install])
    assert " -q" not in plan[install] and "--quiet" not in plan[install]
    serve = next(i for i, line in enumerate(plan) if line.endswith("keyplane serve"))
    assert "KEYPLANE_PORT" in plan[serve - 1]
