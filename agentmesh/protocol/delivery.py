"""The hub's delivery rules for one logged-in agent, without I/O.

:class:`Delivery` decides what the hub pushes to one authenticated connection
and when it reads the agent's mailbox: the cursor, paging, the in-flight
window, acknowledgements and, with several hubs on one database, whether this
connection holds the agent's lease. The driver (:mod:`agentmesh.hub.server`)
feeds it events and carries out what it returns:

* :meth:`Delivery.committed`: this hub committed an envelope for the agent;
  returns the envelopes to push now (that one, or none: then a page is due);
* :meth:`Delivery.woken`: another hub (LISTEN/NOTIFY) or the periodic
  catch-up says there may be mail; a page is due;
* :meth:`Delivery.next_page`: returns a :class:`PageRequest` when the driver
  must read the mailbox (``seq > after_seq``, at most ``limit`` rows, in
  ``seq`` order), then :meth:`Delivery.page_read` (or
  :meth:`Delivery.page_failed`) with what it read; returns what to push;
* :meth:`Delivery.acked`: the agent acknowledged pushes; returns the ids the
  driver must delete from the store;
* :meth:`Delivery.lease`: the lease was granted or renewed until a time.

Contract: every envelope a method returns must be pushed, in the returned
order, before the next call; the object has then recorded it as in flight.
Local pushes and cross-hub wake-ups go through the same rules, so a hub never
pushes an envelope twice on one connection nor out of ``seq`` order.

Why a cursor is safe (read with :mod:`agentmesh.hub.store`, "Cursors"):
the cursor is the highest ``seq`` pushed on this connection and pages read
``seq > cursor``. That skips nothing only if, for one recipient, envelopes
commit in ``seq`` order. A PostgreSQL sequence alone does not give that: two
transactions draw 10 and 11, 11 commits first, a page reads 11 and moves the
cursor past 10, which commits a moment later and is never read. The store
makes it true per recipient (the mailbox row lock, taken before the ``seq`` is
drawn, is held to the commit). A local commit is pushed at once only if the
store says no earlier envelope of the recipient is unseen (``prev_seq <=
cursor``); otherwise, e.g. another hub committed one in between, a page reads
them all in order.

Time is passed in (``now_ms``, milliseconds); nothing here reads a clock.
Never imports asyncio, sockets or SQL (an import-linter contract).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["Delivery", "PageRequest", "Queued"]


class Queued(Protocol):
    """What the rules need of a stored envelope."""

    @property
    def seq(self) -> int: ...

    @property
    def message_id(self) -> bytes: ...


_Q = TypeVar("_Q", bound=Queued)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Read the agent's queued envelopes with ``seq > after_seq``, at most ``limit``."""

    after_seq: int
    limit: int


class Delivery(Generic[_Q]):
    """Delivery state of one authenticated connection (see the module docstring).

    ``window``: at most this many pushes unacknowledged. ``lease_until_ms``:
    pushes are allowed while ``now_ms < lease_until_ms``; None means always
    (one hub on its own database holds every lease); 0 means not yet granted.
    """

    def __init__(self, *, window: int, lease_until_ms: int | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._lease_until_ms = lease_until_ms
        #: The highest seq pushed on this connection.
        self.cursor = 0
        #: Pushed, not yet acknowledged: message id -> seq.
        self.inflight: dict[bytes, int] = {}
        #: The mailbox may hold envelopes after the cursor that were not pushed.
        self.backlog = True
        #: A page was requested and its result is not in yet.
        self.paging = False
        # Something arrived while a page was being read: read once more afterwards
        # (the page's snapshot may predate it).
        self._arrived_while_paging = False

    # -- lease --------------------------------------------------------------

    def lease(self, until_ms: int | None) -> None:
        """The lease is held until ``until_ms`` (None: for good; 0: lost or not granted)."""
        self._lease_until_ms = until_ms

    def may_push(self, now_ms: int) -> bool:
        """Whether this connection holds the agent's lease at ``now_ms``."""
        return self._lease_until_ms is None or now_ms < self._lease_until_ms

    # -- events -------------------------------------------------------------

    def committed(self, item: _Q, prev_seq: int | None, now_ms: int) -> list[_Q]:
        """This hub committed ``item`` for the agent; return what to push now.

        ``prev_seq`` is the highest ``seq`` the agent's mailbox held before
        ``item`` (read under the lock that orders the recipient's commits), or
        None if this hub is the database's only writer, whose commits arrive
        here in ``seq`` order.
        """
        if item.seq <= self.cursor:
            return []
        unseen_before = prev_seq is not None and prev_seq > self.cursor
        if (
            self.backlog
            or self.paging
            or unseen_before
            or len(self.inflight) >= self.window
            or not self.may_push(now_ms)
        ):
            self._mail_may_wait()
            return []
        self._record(item)
        return [item]

    def woken(self) -> None:
        """There may be mail this connection has not seen (another hub, a catch-up)."""
        self._mail_may_wait()

    def next_page(self, now_ms: int) -> PageRequest | None:
        """A page to read now, or None (nothing due, one in progress, the window full,
        or no lease). After a request, call :meth:`page_read` or :meth:`page_failed`."""
        if self.paging or not self.backlog or not self.may_push(now_ms):
            return None
        room = self.window - len(self.inflight)
        if self.inflight and room < max(1, self.window // 2):
            return None  # wait for acknowledgements: pages of at least half a window
        self.paging = True
        self._arrived_while_paging = False
        return PageRequest(self.cursor, room)

    def page_read(self, request: PageRequest, rows: Sequence[_Q], now_ms: int) -> list[_Q]:
        """The rows ``request`` read, in ``seq`` order; return what to push now."""
        self.paging = False
        if not self.may_push(now_ms):
            self.backlog = True  # the lease lapsed meanwhile: read again once renewed
            return []
        pushed: list[_Q] = []
        for row in rows:
            if row.seq > self.cursor and row.message_id not in self.inflight:
                self._record(row)
                pushed.append(row)
        self.backlog = len(rows) >= request.limit or self._arrived_while_paging
        return pushed

    def page_failed(self) -> None:
        """Reading the page failed; the backlog stays, to be read again later."""
        self.paging = False
        self.backlog = True

    def acked(self, message_ids: Iterable[bytes]) -> tuple[bytes, ...]:
        """The agent acknowledged these ids; return those pushed on this connection.

        Only they go to the store: an id pushed on an earlier connection is
        acknowledged again after it is pushed again.
        """
        return tuple(mid for mid in message_ids if self.inflight.pop(mid, None) is not None)

    # -- internals ------------------------------------------------------------

    def _mail_may_wait(self) -> None:
        self.backlog = True
        if self.paging:
            self._arrived_while_paging = True

    def _record(self, item: _Q) -> None:
        self.inflight[item.message_id] = item.seq
        self.cursor = item.seq
