"""The dashboard at /ui: server-rendered pages over the same service layer as the REST API, CLI and MCP tools."""
