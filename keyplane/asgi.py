"""``keyplane.asgi:app`` for any ASGI server (uvicorn, granian, hypercorn); settings from the environment."""

from keyplane.app import KeyplaneApp
from keyplane.config import load_or_exit
from keyplane.logs import configure_logging

_settings = load_or_exit()
configure_logging(_settings.log_level)
app = KeyplaneApp(_settings, owns_process=True)
