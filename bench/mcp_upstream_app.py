"""The upstream for bench/mcp_gateway.py: an MCP server built with the official Python SDK, stateless, JSON answers.

    uvicorn bench.mcp_upstream_app:app
"""

from __future__ import annotations

import logging

from mcp.server.mcpserver import MCPServer

logging.getLogger("mcp").setLevel(logging.WARNING)  # the SDK logs every stateless request at INFO

server = MCPServer("bench-upstream")


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


app = server.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=True)
