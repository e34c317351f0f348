"""The outside attacker, kept: schemathesis drives every control-plane operation from the live OpenAPI.

All of schemathesis' checks run on every answer (no server errors, documented statuses, conforming
schemas and content types, schema-valid input accepted, schema-invalid input refused), plus one of ours:
every refusal is keyplane's one error shape. Bounded examples keep each backend well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, CheckContext, GenerationMode, Response

from keyplane.app import KeyplaneApp
from tests.processes import free_port

EXAMPLES = 5  # per operation and mode: ~30 operations x 2 modes per backend
# Schema-valid input may still be refused for what no schema can say (a cursor this API never issued, an
# unknown scope, a CIDR that does not parse): that is a documented 400. A 422 is a schema refusal, so a
# schema-valid request must never get one: the schema would be lying.
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]}}})


def error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx/5xx answer is ``{"error": {"code", "message", "type", ...}}`` as JSON."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"{response.status_code} answered as {content_type!r}"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the error shape: {body!r}"
    err = body["error"]
    assert isinstance(err, dict), f"not the error shape: {body!r}"
    for field in ("code", "message", "type"):
        assert isinstance(err.get(field), str) and err[field], f"error.{field} missing: {body!r}"
    return True


@contextmanager
def served(app: KeyplaneApp) -> Iterator[str]:
    """The app over real HTTP in a thread of its own, so the synchronous fuzzer can call it."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fuzz-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


TIMES: dict[str, float] = {}


def existing_resources(url: str, headers: dict[str, str]) -> dict[str, str]:
    """One of each resource, so that operations on /{id} also run against something that exists."""
    with httpx.Client(base_url=url, headers=headers) as http:
        def made(path: str, body: dict[str, Any], field: str) -> str:
            resp = http.post(path, json=body)
            assert resp.status_code == 201, resp.text
            return str(next(iter(v for v in resp.json().values() if isinstance(v, dict)))[field])

        key_id = made("/api/v1/keys", {"name": "fuzz"}, "id")
        return {
            "/api/v1/keys/": key_id,
            "/api/v1/service-accounts/": made("/api/v1/service-accounts", {"name": "fuzz", "scopes": ["usage:read"]},
                                              "id"),
            "/api/v1/limit-profiles/": made("/api/v1/limit-profiles", {"name": "fuzz", "requests_per_minute": 5},
                                            "name"),
            "/api/v1/providers/": made("/api/v1/providers", {"name": "fuzz", "base_url": "http://127.0.0.1:9/v1",
                                                             "models": [{"name": "fuzz-model"}]}, "name"),
            "/api/v1/alerts/": made("/api/v1/alerts", {"name": "fuzz", "kind": "error_rate", "key_id": key_id,
                                                       "threshold": 0.2, "webhook_url": "http://127.0.0.1:9/hook"},
                                    "id"),
        }


def fuzz(url: str, token: str) -> tuple[int, list[str]]:
    spec = httpx.get(f"{url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec, config=CONFIG)
    headers = {"Authorization": f"Bearer {token}"}
    existing = existing_resources(url, headers)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        declared = spec["paths"][operation.path][operation.method.lower()]
        # Path parameters alone cannot carry schema-invalid values over HTTP (schemathesis filters them all
        # away): negative cases for the operations with a query or a body.
        negatable = "requestBody" in declared or any(p["in"] == "query" for p in declared.get("parameters", []))
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,)
        runs: list[tuple[GenerationMode, dict[str, str] | None]] = [(mode, None) for mode in modes]
        path_names = [p["name"] for p in declared.get("parameters", []) if p["in"] == "path"]
        real = next((v for prefix, v in existing.items() if operation.path.startswith(prefix)), None)
        if len(path_names) == 1 and real is not None:
            runs.append((GenerationMode.POSITIVE, {path_names[0]: real}))
        for mode, pinned in runs:

            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=pinned))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case: Case) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=url, headers=headers, additional_checks=[error_shape])

            started = time.monotonic()
            try:
                run()
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} [{mode.value}{' existing' if pinned else ''}]: {exc}"[:3000])
            finally:
                TIMES[f"{operation.label} [{mode.value}{' existing' if pinned else ''}]"] = time.monotonic() - started
    return calls, failures


async def test_the_openapi_holds_under_fuzzing(backend: str, settings_factory: Callable[..., Any]) -> None:
    if backend == "distributed":
        pytest.skip("the distributed mode's store is PostgreSQL, fuzzed already; Redis changes no schema")
    app = KeyplaneApp(settings_factory())
    with served(app) as url:
        assert app.bootstrap is not None and app.bootstrap.admin_token
        started = time.monotonic()
        calls, failures = await asyncio.to_thread(fuzz, url, app.bootstrap.admin_token)
        elapsed = time.monotonic() - started
    print(f"fuzzed {calls} requests in {elapsed:.1f}s; slowest:", sorted(TIMES.items(), key=lambda kv: -kv[1])[:5])
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)
    assert calls > 200, calls
    assert elapsed < 120, elapsed
