"""``keyplane.asgi:app`` for any ASGI server (uvicorn, granian, hypercorn); settings from the environment."""

from keyplane.app import KeyplaneApp

app = KeyplaneApp()
