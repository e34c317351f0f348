"""The dashboard at /ui: server-rendered pages over the same service layer as the REST API, CLI and MCP tools."""

PREFIX = "/ui"  # where the dashboard is mounted: every page, link and the session cookie live under it
