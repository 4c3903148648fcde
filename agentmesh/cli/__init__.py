"""Front ends: the ``agentmesh`` command line and ``agentmesh mcp``.

The top layer (docs/ARCHITECTURE.md): it drives :class:`~agentmesh.Agent`,
:class:`~agentmesh.AsyncAgent` and :class:`~agentmesh.NetworkHub` and nothing
imports it. ``import agentmesh`` never loads it, so neither click nor the MCP SDK
loads with the library; the MCP SDK loads only for ``agentmesh mcp``.
"""

from agentmesh.cli.commands import main

__all__ = ["main"]
