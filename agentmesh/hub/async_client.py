"""``AsyncNetworkHub``: the network hub client whose connections run on the caller's
event loop, for :class:`~agentmesh.AsyncAgent` and other asyncio code.

It takes exactly :class:`~agentmesh.hub.client.NetworkHub`'s arguments (``host,
port=7700`` or ``servers=["host1:7700", "host2:7700"]`` for failover between hubs
sharing one PostgreSQL, ``tls=``, ``server_hostname=``, ``expected_hub_address=``,
…) and keeps its promises, with one difference: the transports, the timers, the
calls into the sans-I/O :class:`~agentmesh.protocol.client_session.ClientSession`
and the reconnects with their backoff run **on the caller's event loop**, the one
running when the hub is first used in async code. That *binds* it:

* ``async with AsyncNetworkHub(...) as hub`` (or any of its coroutines:
  :meth:`~AsyncNetworkHub.aregister`, :meth:`~AsyncNetworkHub.alist_agents`, …);
* an :class:`~agentmesh.AsyncAgent` registering with it (``AsyncAgent`` calls
  :meth:`~AsyncNetworkHub.bind_running_loop` first: the hub has the
  :class:`~agentmesh.protocol.hub_interface.LoopBoundHub` capability);
* :meth:`~AsyncNetworkHub.bind_running_loop` itself, called on the loop.

No ``agentmesh-hub-client`` thread is started. One hub serves one loop: using
it from another loop raises :class:`~agentmesh.errors.LocalProtocolError`.

The sync ``NetworkHub`` API works from **other threads** (``AsyncAgent`` runs its
``Agent``'s sends and registration in executor threads): each blocking call is
handed to the loop with :func:`asyncio.run_coroutine_threadsafe` and waited for.
A blocking call made on the loop's own thread would wait for the loop it blocks,
so it raises LocalProtocolError naming the coroutine to await instead; so does a
sync call on a hub not bound yet, from a thread running no loop.

Threads and tasks
    On the loop, per registered agent: the task ``agentmesh-link-<id>`` (connect,
    log in, reconnect with backoff) and ``agentmesh-effects-<id>`` (answers the
    session's endpoint effects in order), plus the transports' callbacks and the
    session's timer; per hub, ``agentmesh-hub-guard`` (notices the loop's end).
    Threads, per registered agent, as with ``NetworkHub``: ``agentmesh-endpoint-<id>``
    (the endpoint calls the effects ask for: signing, reading prekeys and the
    outbox, recording acknowledgements), ``agentmesh-dispatch-<id>`` (hands pushes
    to the endpoint, which decrypts and fsyncs them) and ``agentmesh-handlers-<id>``.
    So the loop never runs the endpoint and never waits for an executor thread,
    while executor threads may wait for the loop: no starvation either way.
    :meth:`~AsyncNetworkHub.aclose` (``__aexit__``) closes the connections on the
    loop and waits, without blocking the loop, until all those threads have ended.

Locks
    Those of ``NetworkHub`` (:mod:`agentmesh.hub.client`): ``NetworkHub._lock``
    (links, the runner) is never held while a link's lock is taken; a link's
    ``_lock`` guards its session, held only while calling it. The runner's own
    lock (:class:`~agentmesh.hub.runner.ForeignLoop`) is a leaf.

If the loop ends first
    ``asyncio.run()`` cancels every task before it closes the loop; the guard task
    then closes the hub (its connections, its threads are told to end) and every
    blocking call waiting in another thread raises HubUnavailableError at once. A
    loop closed without that (``loop.close()`` by hand) is noticed within 0.1 s by
    waiting calls; :meth:`~AsyncNetworkHub.close` then ends the connections at
    their sockets. Nothing waits for a loop that will not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from agentmesh.errors import HubUnavailableError, LocalProtocolError
from agentmesh.hub import client as _client
from agentmesh.hub.client import NetworkHub
from agentmesh.hub.runner import ForeignLoop, LoopRunner
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.hub_interface import EndpointOwner, HubEndpoint, endpoint_of
from agentmesh.wire.envelope import decode_envelope

__all__ = ["AsyncNetworkHub"]

_T = TypeVar("_T")

#: What to await instead of each blocking method (named in the errors).
_ASYNC_FORMS = {
    "register": "await hub.aregister(agent)",
    "register_in_background": "await hub.aregister(agent, background=True)",
    "unregister": "await hub.aunregister(agent_id)",
    "deliver": "await hub.adeliver(envelope)",
    "fetch_prekey_bundle": "await hub.afetch_prekey_bundle(agent_id)",
    "get_bundle": "await hub.afetch_prekey_bundle(agent_id)",
    "list_agents": "await hub.alist_agents()",
    "stats": "await hub.astats()",
    "queued_count": "await hub.aqueued_count()",
    "message_count": "await hub.aqueued_count()",
    "close": "await hub.aclose()",
}


def _blocking(call: str) -> str:
    """The error for the blocking ``call`` made on the loop's own thread."""
    instead = _ASYNC_FORMS.get(call, "await loop.run_in_executor(None, ...) to call it")
    return (
        f"AsyncNetworkHub.{call}() blocks until the event loop has done the work, and "
        f"this thread is running that loop: it would deadlock. Use {instead}, or an "
        "AsyncAgent (it calls the hub from executor threads)"
    )


class AsyncNetworkHub(NetworkHub):
    """A network hub client driven by the caller's event loop:
    ``async with AsyncNetworkHub(host, port) as hub``. See the module docstring."""

    def __repr__(self) -> str:
        return "Async" + super().__repr__()

    # -- the loop -----------------------------------------------------------

    def bind_running_loop(self) -> None:
        """Drive the connections on the event loop running in this thread (idempotent).

        Raises LocalProtocolError without a running loop, if the hub is closed, or
        if it is bound to another loop (one AsyncNetworkHub per loop)."""
        self._bound()

    def _bound(self) -> ForeignLoop:
        """The runner, bound to the running loop on first use; checks it is this loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError(
                "AsyncNetworkHub.bind_running_loop() must be called on a running event loop"
            ) from None
        with self._lock:
            if self._closed:
                raise LocalProtocolError("this AsyncNetworkHub is closed")
            io = self._io
            if io is None:
                io = self._io = ForeignLoop(loop, describe=_blocking, on_loop_end=self._loop_ended)
        assert isinstance(io, ForeignLoop)
        if io.loop is not loop:
            raise LocalProtocolError(
                "this AsyncNetworkHub runs on another event loop"
                + (" (now closed)" if io.loop.is_closed() else "")
                + ": make one AsyncNetworkHub per event loop"
            )
        return io

    def _new_runner(self, call: str) -> LoopRunner:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError(
                f"AsyncNetworkHub.{call}(): this hub is not bound to an event loop yet. "
                "Use it in async code first (async with AsyncNetworkHub(...), or "
                "AsyncAgent(..., hub=hub)); sync code without a loop wants NetworkHub"
            ) from None
        raise LocalProtocolError(_blocking(call))

    def _loop_ended(self) -> None:
        """The loop's thread, as the loop ends before aclose(): close everything
        without waiting (the threads are told to end; the loop runs the closes)."""
        with self._lock:
            self._closed = True
            links, self._links = list(self._links.values()), {}
            self._io = None
        for link in links:
            with contextlib.suppress(RuntimeError):  # closed under our feet
                link.close_now()

    # -- coroutines -----------------------------------------------------------

    async def aregister(
        self, agent: HubEndpoint | EndpointOwner, *, background: bool = False
    ) -> None:
        """Coroutine of :meth:`NetworkHub.register` (``background=True``: of
        :meth:`NetworkHub.register_in_background`). On the loop; the endpoint's
        calls run on the link's own threads."""
        io = self._bound()
        endpoint = endpoint_of(agent)
        await self.aunregister(endpoint.agent_id)
        link = self._add_link(endpoint, io)
        try:
            try:
                await asyncio.wait_for(link.start(background=background), self._start_timeout)
            except asyncio.TimeoutError:
                raise HubUnavailableError(
                    f"the hub did not answer within {self._start_timeout}s"
                ) from None
        except BaseException:
            self._drop_link(link)
            link.close_now()
            await link.ajoin(self.request_timeout)
            raise

    async def aunregister(self, agent_id: str) -> None:
        """Coroutine of :meth:`NetworkHub.unregister`: closes the connection and waits,
        without blocking the loop, for the link's threads to end."""
        with self._lock:
            link = self._links.get(agent_id)
        if link is None:
            return
        self._bound()
        self._drop_link(link)
        link.close_now()
        await link.ajoin(self.request_timeout)

    async def adeliver(self, envelope: bytes) -> None:
        """Coroutine of :meth:`NetworkHub.deliver` (the endpoint's ``envelope_acked``
        runs on the link's endpoint thread, not on the loop)."""
        self._bound()
        parsed = decode_envelope(envelope)
        link = self._link(parsed.sender)
        message_id = await self._timed(link.send(envelope, parsed), self.ack_timeout + 1.0)
        await link._in_executor(link.endpoint.envelope_acked, message_id)

    async def afetch_prekey_bundle(self, agent_id: str) -> bytes:
        """Coroutine of :meth:`NetworkHub.fetch_prekey_bundle`."""
        self._bound()
        event = await self._timed(
            self._any_request(lambda session: session.fetch_bundle(agent_id)),
            self.request_timeout + 1.0,
        )
        return _client._checked_bundle(agent_id, event)

    async def alist_agents(self) -> list[str]:
        """Coroutine of :meth:`NetworkHub.list_agents` (no registered agent needed)."""
        self._bound()
        event = await self._timed(
            self._anonymous_request(lambda session: session.list_agents()),
            self.request_timeout + 1.0,
        )
        return list(_client._expect(event, hp.AgentsReceived).agent_ids)

    async def astats(self) -> dict[str, int]:
        """Coroutine of :meth:`NetworkHub.stats`."""
        self._bound()
        event = await self._timed(
            self._anonymous_request(lambda session: session.get_stats()),
            self.request_timeout + 1.0,
        )
        return dict(_client._expect(event, hp.StatsReceived).stats)

    async def aqueued_count(self) -> int:
        """Coroutine of :meth:`NetworkHub.queued_count`."""
        return (await self.astats()).get("queued", 0)

    async def _timed(self, coro: Awaitable[_T], timeout: float) -> _T:
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise HubUnavailableError(f"the hub did not answer within {timeout}s") from None

    async def aclose(self) -> None:
        """Close every connection on the loop and wait, without blocking it, until the
        hub's threads have ended. Idempotent. The loop itself runs on.

        On a hub never bound it only marks it closed; once its loop has closed it
        is :meth:`close`, which waits for nothing then."""
        with self._lock:
            if self._closed:
                return
            io = self._io
        if io is None or io.loop.is_closed():
            self.close()
            return
        if not io.current:
            raise LocalProtocolError(
                "AsyncNetworkHub.aclose() must be awaited on the event loop the hub runs on"
            )
        with self._lock:
            agent_ids = list(self._links)
        for agent_id in agent_ids:
            await self.aunregister(agent_id)
        with self._lock:
            self._closed = True
            io, self._io = self._io, None
        if io is not None:
            io.stop()

    async def __aenter__(self) -> AsyncNetworkHub:
        self.bind_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
