"""``AsyncNetworkHub``: the network hub client for :class:`~agentmesh.AsyncAgent`.

It takes exactly :class:`~agentmesh.hub.client.NetworkHub`'s arguments (``host,
port=7700`` or ``servers=["host1:7700", "host2:7700"]`` for failover between hubs
sharing one PostgreSQL, ``tls=``, ``server_hostname=``, ``expected_hub_address=``, …) and is
a ``NetworkHub``: the connections, their login, outbox flush, acknowledgements and
reconnects run on the client's own I/O thread (see :mod:`agentmesh.hub.client`),
so the caller's event loop never waits for the network; ``AsyncAgent`` calls it
from executor threads. On top it is an asynchronous context manager and offers
coroutine forms of the queries and of ``close``.

The connection logic is the sans-I/O
:class:`~agentmesh.protocol.client_session.ClientSession`, driven here by
``NetworkHub``'s thread driver. A second driver on the caller's loop waits for the
agent core split: ``AsyncAgent`` drives a sync ``Agent`` from executor threads,
and those threads would then wait for the loop while the loop waits for the
executor to run the endpoint's calls (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentmesh.hub.client import NetworkHub


class AsyncNetworkHub(NetworkHub):
    """A :class:`NetworkHub` for asyncio code: ``async with AsyncNetworkHub(host, port)``."""

    async def aclose(self) -> None:
        """Close every connection and stop the I/O thread, without blocking the loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def alist_agents(self) -> list[str]:
        """Coroutine of :meth:`NetworkHub.list_agents`."""
        return await asyncio.get_running_loop().run_in_executor(None, self.list_agents)

    async def astats(self) -> dict[str, int]:
        """Coroutine of :meth:`NetworkHub.stats`."""
        return await asyncio.get_running_loop().run_in_executor(None, self.stats)

    async def __aenter__(self) -> AsyncNetworkHub:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
