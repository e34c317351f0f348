"""The MCP server at /mcp: tools for coding agents, each a thin adapter over the service layer."""
