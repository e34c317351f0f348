"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models a key may use, as the OpenAI SDKs list them."""

from __future__ import annotations

from typing import Any

from keyplane.domain.errors import KeyplaneError
from keyplane.gateway.asgi import Send, send_json
from keyplane.gateway.enforce import Admission
from keyplane.services.container import Keyplane
from keyplane.services.providers import Route


def _model(name: str, route: Route) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": route.provider}


async def send_models(kp: Keyplane, admission: Admission, send: Send) -> None:
    routes = await kp.routes_for(admission.key.org_id)
    allowed = admission.key.allowed_models
    data = [_model(name, route) for name, route in sorted(routes.items()) if not allowed or name in allowed]
    await send_json(send, 200, {"object": "list", "data": data}, admission.headers)


async def send_model(kp: Keyplane, admission: Admission, name: str, send: Send) -> None:
    """``GET /v1/models/{id}``: the model as listed, or 404 when this key cannot see it (as if it did not exist)."""
    route = (await kp.routes_for(admission.key.org_id)).get(name)
    allowed = admission.key.allowed_models
    if route is None or (allowed and name not in allowed):
        raise KeyplaneError(404, "not_found", f"No model '{name}' is available to this key", extra={"param": "model"})
    await send_json(send, 200, _model(name, route), admission.headers)
