"""Loop runners: the event loop a network hub client's connections run on, and how its
blocking (sync) API reaches that loop.

:class:`~agentmesh.hub.client.NetworkHub` drives every connection (transports,
timers, the :class:`~agentmesh.protocol.client_session.ClientSession` calls,
reconnects and their backoff) on one asyncio event loop, which a *loop runner*
provides:

:class:`IOThread` (``NetworkHub``)
    A private daemon thread, ``agentmesh-hub-client``, running a loop of its own
    until :meth:`IOThread.stop`.

:class:`ForeignLoop` (``AsyncNetworkHub``)
    The caller's running loop. Blocking calls from other threads (an
    ``AsyncAgent``'s executor threads) reach it with
    :func:`asyncio.run_coroutine_threadsafe`; a blocking call made on the loop's
    own thread raises :class:`~agentmesh.errors.LocalProtocolError`, since it
    would wait for the loop it blocks. :meth:`ForeignLoop.stop` never stops or
    closes the caller's loop. One task of its own, ``agentmesh-hub-guard``, notices
    when the loop is ending (``asyncio.run`` cancels every task before it closes
    the loop) and then tells its owner, so that nothing waits for a loop that will
    not run again.

Both have the same interface: :attr:`~LoopRunner.current`, :meth:`~LoopRunner.submit`,
:meth:`~LoopRunner.run`, :meth:`~LoopRunner.call_soon` and :meth:`~LoopRunner.stop`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agentmesh.errors import HubUnavailableError, LocalProtocolError

__all__ = ["ForeignLoop", "IOThread", "LoopRunner"]

_T = TypeVar("_T")
#: A thread blocked in ForeignLoop.run() checks this often whether the loop has closed.
_POLL_S = 0.1


class LoopRunner:
    """Where a hub client's coroutines run (see the module docstring)."""

    loop: asyncio.AbstractEventLoop

    @property
    def current(self) -> bool:
        """Whether the calling thread is the one running :attr:`loop` now."""
        raise NotImplementedError

    def blocked(self, call: str) -> LocalProtocolError:
        """The error for the blocking method ``call`` made on the loop's thread."""
        raise NotImplementedError

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop from any thread; the future has its outcome."""
        raise NotImplementedError

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, *, call: str) -> _T:
        """Run ``coro`` on the loop and wait (never on the loop's own thread: that
        raises :meth:`blocked` for ``call``). On timeout cancel it and raise
        HubUnavailableError."""
        raise NotImplementedError

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Any thread: run ``callback(*args)`` on the loop soon. Raises RuntimeError
        once the loop is closed."""
        self.loop.call_soon_threadsafe(callback, *args)

    def stop(self) -> None:
        """The hub is done with the loop (its connections are closed by then)."""
        raise NotImplementedError


class IOThread(LoopRunner):
    """A daemon thread (``agentmesh-hub-client``) running one event loop until
    :meth:`stop`; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="agentmesh-hub-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # stop() cancelled every task; let them finish cancelling before the loop is
        # closed, or each is "destroyed but pending" (an asyncio ERROR on stderr).
        pending = asyncio.all_tasks(self.loop)
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    @property
    def current(self) -> bool:
        return threading.current_thread() is self._thread

    def blocked(self, call: str) -> LocalProtocolError:
        return LocalProtocolError(f"NetworkHub.{call}() must not be called from its I/O thread")

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, *, call: str) -> _T:
        if self.current:
            coro.close()
            raise self.blocked(call)
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HubUnavailableError(f"the hub did not answer within {timeout}s") from None

    def stop(self) -> None:
        """Cancel the loop's tasks, stop the loop and wait (5 s at most) for the thread."""

        def shutdown() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(shutdown)
        if not self.current:
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self.loop.close()


class ForeignLoop(LoopRunner):
    """The caller's running event loop, borrowed (never stopped or closed here).

    Made on the loop's thread while it runs. ``describe(call)`` words the error
    for a blocking call made on that thread; ``on_loop_end()`` runs on the loop
    when the loop ends before :meth:`stop` (its owner's tasks are being cancelled
    then; it must close what it has without waiting).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        describe: Callable[[str], str],
        on_loop_end: Callable[[], None],
    ) -> None:
        self.loop = loop
        self._describe = describe
        self._on_loop_end = on_loop_end
        #: Guards _ended and _pending; a leaf lock (nothing is called while it is held).
        self._lock = threading.Lock()
        #: Why calls fail from now on, once stopped or once the loop is ending.
        self._ended: str | None = None
        #: Futures of run() callers in other threads, cancelled (waking them) at the end.
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._released: asyncio.Future[None] = loop.create_future()
        self._guard = loop.create_task(self._watch(), name="agentmesh-hub-guard")

    async def _watch(self) -> None:
        try:
            await self._released
        except asyncio.CancelledError:
            # Nobody but the loop's owner cancels this task: asyncio.run() does, for
            # every task, once its main coroutine has returned.
            if self._end("the event loop this AsyncNetworkHub ran on has ended"):
                self._on_loop_end()
            raise

    def _end(self, why: str) -> bool:
        """Fail every later call with ``why`` and wake the waiting ones; False if
        that had happened already."""
        with self._lock:
            if self._ended is not None:
                return False
            self._ended = why
            pending, self._pending = self._pending, set()
        for future in pending:
            future.cancel()
        return True

    @property
    def ended(self) -> bool:
        """Stopped, or the loop ended: no coroutine of the hub runs any more."""
        return self._ended is not None or self.loop.is_closed()

    @property
    def current(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def blocked(self, call: str) -> LocalProtocolError:
        return LocalProtocolError(self._describe(call))

    def _why_not(self) -> str | None:
        if self._ended is not None:
            return self._ended
        if self.loop.is_closed():
            return "the event loop this AsyncNetworkHub ran on is closed"
        return None

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Raises HubUnavailableError once the hub stopped or its loop ended."""
        why = self._why_not()
        if why is None:
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except RuntimeError:  # closed just now
                why = "the event loop this AsyncNetworkHub ran on is closed"
            else:
                with self._lock:
                    if self._ended is None:
                        self._pending.add(future)
                        return future
                    why = self._ended
                future.cancel()
                raise HubUnavailableError(why)
        coro.close()
        raise HubUnavailableError(why)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, *, call: str) -> _T:
        if self.current:
            coro.close()
            raise self.blocked(call)
        future = self.submit(coro)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = _POLL_S if deadline is None else deadline - time.monotonic()
                try:
                    return future.result(max(0.0, min(_POLL_S, remaining)))
                except concurrent.futures.TimeoutError:
                    why = self._why_not()
                    if why is not None:  # the loop will never finish it
                        future.cancel()
                        raise HubUnavailableError(why) from None
                    if deadline is not None and time.monotonic() >= deadline:
                        future.cancel()
                        raise HubUnavailableError(
                            f"the hub did not answer within {timeout}s"
                        ) from None
                except concurrent.futures.CancelledError:
                    raise HubUnavailableError(self._why_not() or "cancelled") from None
        finally:
            with self._lock:
                self._pending.discard(future)

    def stop(self) -> None:
        """Any thread: later calls raise; the guard task ends. The loop runs on."""
        self._end("this AsyncNetworkHub is closed")

        def release() -> None:
            if not self._released.done():
                self._released.set_result(None)

        if self.current:
            release()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to end
                self.loop.call_soon_threadsafe(release)
