"""``AsyncAgent``: the asyncio driver of an agent, for asyncio frameworks and MCP servers.

``AsyncAgent`` takes :class:`~agentmesh.agent.Agent`'s options and keeps its
promises (durable outbox and inbox, the same crypto and state file); its methods
are coroutines with the sync names. It drives an ``Agent`` underneath:

* Work that blocks (encryption plus the fsync of a send, the hub round trip,
  opening the key and state files) runs in the loop's default executor, so the
  event loop never waits for the disk or the network. Cancelling such an await
  does not undo the work: a send whose await was cancelled may still be sent
  (it is in the outbox), as with any at-least-once system.
* Handlers, sync or async, run **on the event loop**, in the task
  ``agentmesh-handlers-<id>``, one message at a time and in arrival order,
  whichever thread delivered the message (the task takes committed messages from
  the durable inbox). A message counts as handled once its handlers have returned
  (or raised, which is logged). So, unlike ``Agent`` on ``LocalHub``, a send to an
  ``AsyncAgent`` returns before its handlers have run.
* ``next_message``/``messages`` take messages on the loop itself (a few SQLite
  reads and no fsync), so a cancelled wait never loses one; ``request`` waits on
  a future that the receiving thread completes, and a cancelled or timed-out
  request leaves a later reply to the handlers or ``next_message``.

Works with :class:`~agentmesh.LocalHub` (deliveries then happen in executor
threads, and handlers still run on the loop), :class:`~agentmesh.NetworkHub` and
:class:`~agentmesh.hub.async_client.AsyncNetworkHub`. A hub whose connections run
on the caller's loop (the :class:`~agentmesh.protocol.hub_interface.LoopBoundHub`
capability, as ``AsyncNetworkHub`` has) is bound to this loop in :meth:`start`,
before the ``Agent`` registers with it from an executor thread.

Threads and tasks: the handler task (started by :meth:`AsyncAgent.start` or the
first ``on_message``, stopped by :meth:`AsyncAgent.close`) and the loop's default
executor; the hub's threads and tasks are the hub's (docs/ARCHITECTURE.md). With
``AsyncNetworkHub`` an executor thread in a send or a registration waits for the
loop (the connection is there), but the loop never waits for an executor thread:
the hub calls the agent on its own threads. So neither can starve the other.
Locks: none of its own; no handler runs while the underlying ``Agent`` holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from agentmesh.agent import (
    Agent,
    DeadLetter,
    Message,
    failure_reason,
    handler_failed,
    handler_retry_delay,
    text_payload,
)
from agentmesh.errors import LocalProtocolError, RequestTimeoutError
from agentmesh.protocol.hub_interface import LoopBoundHub, supports

_T = TypeVar("_T")
AsyncHandler = Callable[["AsyncMessage"], Any]


@dataclass(frozen=True)
class AsyncMessage(Message):
    """A :class:`~agentmesh.agent.Message` received by an :class:`AsyncAgent`:
    ``await msg.reply(...)``."""

    _owner: AsyncAgent | None = field(default=None, repr=False, compare=False)

    async def reply(self, text: str = "", **kwargs: Any) -> str:  # type: ignore[override]
        """Answer this message (see :meth:`AsyncAgent.reply`); returns the reply's id."""
        if self._owner is None:
            raise LocalProtocolError("this message was not received by an agent: nothing replies")
        return await self._owner.reply(self, text, **kwargs)


def _as_async(message: Message, owner: AsyncAgent) -> AsyncMessage:
    values = {f.name: getattr(message, f.name) for f in fields(Message)}
    return AsyncMessage(**values, _owner=owner)


class AsyncAgent:
    """An agent driven by asyncio: ``async with AsyncAgent("alice", hub=hub) as alice:``.

    Takes the same arguments as :class:`~agentmesh.agent.Agent`. The files are
    opened and the agent registers with its hub in :meth:`start` (run by
    ``async with`` and by the first coroutine that needs it), not in the
    constructor. ``fingerprint``, ``public_bundle``, ``id``/``agent_id`` and
    ``status()`` are plain attributes and calls, as on ``Agent``.
    """

    def __init__(self, agent_id: str, hub: Any = None, *args: Any, **kwargs: Any) -> None:
        self._agent_id = agent_id
        self._hub = hub
        self._args = args
        self._kwargs = kwargs
        self._agent: Agent | None = None
        self._starting: asyncio.Future[Agent] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: list[AsyncHandler] = []
        #: Set (on the loop) whenever messages may have arrived: wakes the handler
        #: task and next_message.
        self._arrived: asyncio.Event | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self.log = logging.getLogger(f"agentmesh.agent.{agent_id}")

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> AsyncAgent:
        """Open the key and state files and register with the hub (idempotent)."""
        await self._started()
        return self

    async def _started(self) -> Agent:
        if self._agent is not None:
            return self._agent
        loop = asyncio.get_running_loop()
        if self._starting is None:
            self._loop = loop
            self._arrived = asyncio.Event()
            self._starting = loop.create_future()
            try:
                if supports(self._hub, LoopBoundHub):
                    # Before Agent(...) registers from an executor thread: the hub's
                    # connections then run on this loop, reached from that thread.
                    self._hub.bind_running_loop()
                make = functools.partial(
                    Agent, self._agent_id, self._hub, *self._args, **self._kwargs
                )
                agent = await loop.run_in_executor(None, make)
            except BaseException as exc:
                self._starting.set_exception(exc)
                self._starting.exception()  # retrieved: no "never retrieved" warning
                self._starting = None
                raise
            agent._arrival_listeners.append(self._wake_from_any_thread)
            self._agent = agent
            self._starting.set_result(agent)
            if self._handlers:
                self._start_handler_task()
            return agent
        return await asyncio.shield(self._starting)

    async def close(self) -> None:
        """Leave the hub and close the files (idempotent). A handler running now is
        waited for."""
        agent = self._agent
        if agent is None:
            return
        task, self._handler_task = self._handler_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # cancelled between messages or in a handler, never mid-take
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._run(agent.close)
        if self._arrived is not None:
            self._arrived.set()

    async def __aenter__(self) -> AsyncAgent:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    def _require(self) -> Agent:
        if self._agent is None:
            raise LocalProtocolError(
                f"AsyncAgent {self._agent_id!r} is not started: use 'async with' or await start()"
            )
        return self._agent

    # -- identity and status (plain, as on Agent) ---------------------------

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def id(self) -> str:
        return self._agent_id

    @property
    def fingerprint(self) -> str:
        return self._require().fingerprint

    @property
    def public_bundle(self) -> dict[str, Any]:
        return self._require().public_bundle

    def status(self) -> dict[str, Any]:
        return self._require().status()

    def safety_number(self, peer_id: str) -> str:
        return self._require().safety_number(peer_id)

    # -- handlers -----------------------------------------------------------

    def on_message(self, handler: AsyncHandler) -> AsyncHandler:
        """Register a handler, sync or async; usable as a decorator. Handlers run on
        the event loop in registration order, one message at a time; one that raises
        is logged and the others still run. Messages that arrived before any handler
        existed go to the first one registered."""
        if not callable(handler):
            raise TypeError("on_message expects a callable")
        self._handlers.append(handler)
        if self._agent is not None and self._handler_task is None:
            self._start_handler_task()
        return handler

    def _start_handler_task(self) -> None:
        loop = self._loop
        assert loop is not None
        self._handler_task = loop.create_task(
            self._handle_forever(), name=f"agentmesh-handlers-{self._agent_id}"
        )

    async def _handle_forever(self) -> None:
        """The handler task: take committed messages in order, run every handler on
        each, then mark it handled (a crash before that runs it again after restart)."""
        agent = self._require()
        arrived = self._arrived
        assert arrived is not None
        while not agent._closed:
            arrived.clear()
            pending = agent._peek_messages(64)
            if not pending:
                await arrived.wait()
                continue
            for seq, message in pending:
                wrapped = _as_async(message, self)
                failure: tuple[AsyncHandler, Exception] | None = None
                for handler in list(self._handlers):
                    error = await self._run_handler(handler, wrapped, agent)
                    if error is not None:
                        failure = (handler, error)
                if failure is None:
                    agent._mark_handled(seq)
                else:
                    agent._dead_letter(seq, message, failure_reason(*failure))

    async def _run_handler(
        self, handler: AsyncHandler, message: AsyncMessage, agent: Agent
    ) -> Exception | None:
        """Run one handler, rerunning it after a short backoff while it raises, up to
        the agent's ``max_handler_attempts``; return None or the last error."""
        attempts = agent._max_handler_attempts
        for attempt in range(1, attempts + 1):
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not handler_failed(self.log, handler, message, exc, attempt, attempts):
                    return exc
            await asyncio.sleep(handler_retry_delay(attempt))
        return None

    def _wake_from_any_thread(self) -> None:
        loop, arrived = self._loop, self._arrived
        if loop is None or arrived is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(arrived.set)
        except RuntimeError:  # the loop has just closed
            pass

    # -- sending ------------------------------------------------------------

    async def send(self, recipient_id: str, text: str = "", **kwargs: Any) -> str:
        """Coroutine of :meth:`Agent.send` (``wait=`` included); returns the message id."""
        agent = await self._started()
        return await self._run(agent.send, recipient_id, text, **kwargs)

    async def send_payload(
        self, recipient_id: str, payload: dict[str, Any], *, wait: bool = True
    ) -> str:
        """Coroutine of :meth:`Agent.send_payload`; returns the message id."""
        agent = await self._started()
        return await self._run(agent.send_payload, recipient_id, payload, wait=wait)

    async def reply(self, message: Message, text: str = "", **kwargs: Any) -> str:
        """Coroutine of :meth:`Agent.reply`; returns the reply's message id."""
        agent = await self._started()
        return await self._run(agent.reply, message, text, **kwargs)

    async def request(
        self, peer_id: str, text: str = "", *, timeout: float = 30.0, **kwargs: Any
    ) -> AsyncMessage:
        """Coroutine of :meth:`Agent.request`: send, then wait for the reply without
        holding a thread. Raises RequestTimeoutError (a TimeoutError) after ``timeout``
        seconds; if cancelled or timed out, a later reply goes to the handlers."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        agent = await self._started()
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()

        def done() -> None:  # from the receiving thread, no lock held
            def resolve() -> None:
                if not answered.done():
                    answered.set_result(None)

            if not loop.is_closed():
                loop.call_soon_threadsafe(resolve)

        message_id = os.urandom(16)
        waiter = agent._await_reply(message_id, done)
        deadline = time.monotonic() + timeout
        try:
            payload = text_payload(text, kwargs)
            await self._run(agent._send, peer_id, payload, wait=True, message_id=message_id)
            remaining = max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(answered), remaining)
            except asyncio.TimeoutError:
                pass
        finally:
            reply = await self._run(agent._stop_waiting, message_id, waiter)
        if reply is None:
            raise RequestTimeoutError(peer_id, message_id.hex(), timeout)
        return _as_async(reply, self)

    async def flush(self, timeout: float | None = None) -> bool:
        """Coroutine of :meth:`Agent.flush`."""
        agent = await self._started()
        return await self._run(agent.flush, timeout)

    async def connect(self, peer_id: str) -> None:
        """Coroutine of :meth:`Agent.connect`."""
        agent = await self._started()
        await self._run(agent.connect, peer_id)

    async def list_peers(self) -> list[str]:
        """Coroutine of :meth:`Agent.list_peers`."""
        agent = await self._started()
        return await self._run(agent.list_peers)

    async def dead_letters(self) -> list[DeadLetter]:
        """Coroutine of :meth:`Agent.dead_letters`."""
        agent = await self._started()
        return await self._run(agent.dead_letters)

    async def retry_dead_letter(self, message_id: str) -> None:
        """Coroutine of :meth:`Agent.retry_dead_letter` (the handler task takes it)."""
        agent = await self._started()
        await self._run(agent.retry_dead_letter, message_id)

    async def discard_dead_letter(self, message_id: str) -> None:
        """Coroutine of :meth:`Agent.discard_dead_letter`."""
        agent = await self._started()
        await self._run(agent.discard_dead_letter, message_id)

    async def trust(self, peer_id: str, fingerprint: str) -> None:
        """Coroutine of :meth:`Agent.trust`."""
        agent = await self._started()
        await self._run(agent.trust, peer_id, fingerprint)

    # -- pulling --------------------------------------------------------------

    async def next_message(self, timeout: float | None = None) -> AsyncMessage:
        """Coroutine of :meth:`Agent.next_message`: the oldest message not handled yet,
        waiting up to ``timeout`` seconds (None: for ever); raises TimeoutError. The
        message is taken on the loop, so a cancelled wait never loses one."""
        agent = await self._started()
        arrived = self._arrived
        assert arrived is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._handlers:
                raise LocalProtocolError(
                    "next_message() is for agents without handlers: messages go to the "
                    "on_message handlers"
                )
            arrived.clear()
            message = agent._take_message()
            if message is not None:
                return _as_async(message, self)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no message for {self._agent_id!r} within {timeout} s")
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def messages(self) -> AsyncIterator[AsyncMessage]:
        """``async for msg in agent.messages()``: messages as they arrive, until close."""
        while True:
            try:
                yield await self.next_message()
            except LocalProtocolError:
                if self._agent is not None and self._agent._closed:
                    return
                raise

    def __repr__(self) -> str:
        return f"AsyncAgent({self._agent_id!r})"


__all__ = ["AsyncAgent", "AsyncMessage"]
