"""keyplane: a self-hosted API-key control plane and gateway for MCP servers and LLM APIs."""

__version__ = "0.1.0"
