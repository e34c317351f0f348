"""``keyplane.asgi:app`` for any ASGI server (uvicorn, granian, hypercorn); settings from the environment."""

from keyplane.app import KeyplaneApp
from keyplane.config import Settings
from keyplane.logs import configure_logging

_settings = Settings()
configure_logging(_settings.log_level)
app = KeyplaneApp(_settings, owns_process=True)
