"""The dashboard's providers page: register, change models and prices, rotate the secret, delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from keyplane.dashboard import PREFIX
from keyplane.dashboard.forms import _error_text, _status_of
from keyplane.domain.errors import KeyplaneError
from keyplane.services.principal import Principal
from keyplane.services.schemas import ProviderCreate, ProviderUpdate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


def _model_prices(text: Any) -> list[dict[str, Any]]:
    """One model per line: ``name``, ``name input output`` or ``name input output cache-write cache-read``
    (USD per million tokens)."""
    models: list[dict[str, Any]] = []
    fields = ("input_per_mtok", "output_per_mtok", "cache_write_per_mtok", "cache_read_per_mtok")
    for line in str(text or "").splitlines():
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) not in (1, 3, 5):
            raise ValueError(f"'{line.strip()}': write a model as 'name', 'name input-price output-price' or "
                             "'name input output cache-write cache-read'")
        model: dict[str, Any] = {"name": parts[0]}
        if len(parts) > 1:
            try:
                model.update({field: float(value) for field, value in zip(fields, parts[1:], strict=False)})
            except ValueError:
                raise ValueError(f"'{line.strip()}': prices are numbers, in USD per million tokens") from None
        models.append(model)
    return models


class ProvidersPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/providers", self.providers, methods=["GET", "POST"]),
            Route("/providers/{name}/delete", self.provider_delete, methods=["POST"]),
            Route("/providers/{name}/update", self.provider_update, methods=["POST"]),
        ]

    async def providers(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> dict[str, Any]:
            return await self.kp.providers.create(principal, ProviderCreate.model_validate({
                "name": str(form.get("name") or ""), "kind": str(form.get("kind") or "openai"),
                "base_url": str(form.get("base_url") or ""),
                "api_key": str(form.get("api_key") or "") or None,
                "models": _model_prices(form.get("models"))}))

        return await self.dash._list_and_create(request, "providers.html", create, self.kp.providers.list)

    async def provider_update(self, request: Request) -> Response:
        """Change a provider's models and prices, and rotate its secret (left blank: kept)."""
        name = request.path_params["name"]
        principal, session, form = await self.dash._change(request)
        try:
            changes: dict[str, Any] = {"models": _model_prices(form.get("models"))}
            if str(form.get("api_key") or ""):
                changes["api_key"] = str(form.get("api_key"))
            await self.kp.providers.update(principal, name, ProviderUpdate.model_validate(changes))
        except (KeyplaneError, ValidationError, ValueError) as exc:
            if isinstance(exc, KeyplaneError) and exc.status in (403, 404):
                return self.dash._forbidden(request, principal, session, exc)
            items = await self.kp.providers.list(principal)
            return self.dash._render(request, "providers.html", principal, session, status=_status_of(exc), items=items,
                                created=None, error=f"{name}: {_error_text(exc)}")
        return RedirectResponse(f"{PREFIX}/providers", status_code=303)

    async def provider_delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        return await self.dash._act_then_return(
            request, lambda principal: self.kp.providers.delete(principal, name), "providers")
