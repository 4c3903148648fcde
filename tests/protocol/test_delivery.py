"""The hub's sans-I/O delivery rules (agentmesh.protocol.delivery), without sockets.

A model mailbox stands in for the store: commits by this hub (fed to
``committed``) and by other hubs (announced, or not, by ``woken``), pages read
at one moment and handed back later (commits may land in between), and acks
that delete rows. Hypothesis drives random interleavings; the invariants are
those the hub relies on: each envelope pushed at most once per connection, in
``seq`` order, never more than ``window`` in flight, never without the lease,
and, once the periodic catch-up has run and the pages are drained, every
queued envelope pushed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agentmesh.protocol.delivery import Delivery, PageRequest


@dataclass(frozen=True)
class Item:
    seq: int
    message_id: bytes


def item(seq: int) -> Item:
    return Item(seq, seq.to_bytes(16, "big"))


def test_a_local_commit_is_pushed_at_once_when_in_order() -> None:
    d: Delivery[Item] = Delivery(window=4)
    request = d.next_page(0)
    assert request == PageRequest(0, 4)
    assert d.page_read(request, [], 0) == []
    assert d.committed(item(1), 0, 0) == [item(1)]
    assert d.committed(item(2), 1, 0) == [item(2)]
    assert d.committed(item(2), 1, 0) == []  # already pushed
    assert d.acked([item(1).message_id, b"unknown"]) == (item(1).message_id,)


def test_a_commit_after_an_unseen_one_waits_for_a_page() -> None:
    d: Delivery[Item] = Delivery(window=4)
    d.page_read(d.next_page(0) or PageRequest(0, 4), [], 0)
    # Another hub committed seq 5 (not seen yet); this hub commits 6 after it.
    assert d.committed(item(6), 5, 0) == []
    request = d.next_page(0)
    assert request == PageRequest(0, 4)
    assert d.page_read(request, [item(5), item(6)], 0) == [item(5), item(6)]


def test_no_push_without_the_lease() -> None:
    d: Delivery[Item] = Delivery(window=4, lease_until_ms=0)
    assert d.next_page(0) is None
    assert d.committed(item(1), 0, 0) == []
    d.lease(100)
    request = d.next_page(50)
    assert request is not None
    assert d.page_read(request, [item(1)], 50) == [item(1)]
    assert d.committed(item(2), 1, 100) == []  # expired at 100
    d.woken()
    assert d.next_page(100) is None
    d.lease(None)
    assert d.next_page(100) == PageRequest(1, 3)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Delivery(window=0)


class DeliveryMachine(RuleBasedStateMachine):
    """One connection's Delivery against a model mailbox shared with other hubs."""

    def __init__(self) -> None:
        super().__init__()
        self.window = 3
        self.delivery: Delivery[Item] = Delivery(window=self.window)
        self.next_seq = 1
        self.queued: dict[int, Item] = {}  # the table: committed, not yet acked
        self.pushed: list[Item] = []
        self.request: PageRequest | None = None
        self.read: list[Item] | None = None  # a page read, not yet handed back
        self.now = 0
        self.shared = True  # prev_seq known (PostgreSQL) or None (one writer)

    def _commit(self) -> tuple[Item, int]:
        new = item(self.next_seq)
        self.next_seq += 1
        prev = max(self.queued, default=0)
        self.queued[new.seq] = new
        return new, prev

    def _pushed(self, items: list[Item]) -> None:
        for each in items:
            assert self.delivery.may_push(self.now)
            self.pushed.append(each)

    @initialize(shared=st.booleans())
    def database(self, shared: bool) -> None:
        self.shared = shared

    @rule()
    def commit_here(self) -> None:
        new, prev = self._commit()
        # One writer (SQLite): no prev_seq, the rules trust that commits arrive in order.
        self._pushed(self.delivery.committed(new, prev if self.shared else None, self.now))

    @precondition(lambda self: self.shared)
    @rule(announced=st.booleans())
    def commit_elsewhere(self, announced: bool) -> None:
        self._commit()
        if announced:  # a NOTIFY; when lost, only the catch-up will tell
            self.delivery.woken()

    @rule()
    def ask_page(self) -> None:
        if self.request is None:
            self.request = self.delivery.next_page(self.now)

    @precondition(lambda self: self.request is not None and self.read is None)
    @rule()
    def read_page(self) -> None:
        assert self.request is not None
        after, limit = self.request.after_seq, self.request.limit
        self.read = [self.queued[s] for s in sorted(self.queued) if s > after][:limit]

    @precondition(lambda self: self.read is not None)
    @rule()
    def hand_back_page(self) -> None:
        assert self.request is not None and self.read is not None
        self._pushed(self.delivery.page_read(self.request, self.read, self.now))
        self.request, self.read = None, None

    @precondition(lambda self: self.request is not None and self.read is None)
    @rule()
    def page_fails(self) -> None:
        self.delivery.page_failed()
        self.request = None

    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        inflight = sorted(self.delivery.inflight)
        if not inflight:
            return
        chosen = data.draw(st.lists(st.sampled_from(inflight), unique=True))
        for mid in self.delivery.acked([*chosen, b"\x00" * 16]):
            del self.queued[int.from_bytes(mid, "big")]

    @invariant()
    def pushed_once_in_order_within_the_window(self) -> None:
        seqs = [each.seq for each in self.pushed]
        assert seqs == sorted(set(seqs))
        assert len(self.delivery.inflight) <= self.window

    @invariant()
    def the_cursor_never_passes_an_unpushed_envelope(self) -> None:
        pushed = {each.seq for each in self.pushed}
        assert all(s in pushed for s in self.queued if s <= self.delivery.cursor)

    def teardown(self) -> None:
        # Quiesce: finish the page in progress, run the periodic catch-up, then
        # read pages and ack until nothing is due. Everything queued was pushed.
        if self.request is not None:
            if self.read is None:
                self.read_page()
            self.hand_back_page()
        self.delivery.woken()
        for _ in range(1000):
            self.request = self.delivery.next_page(self.now)
            if self.request is None:
                for mid in self.delivery.acked(list(self.delivery.inflight)):
                    del self.queued[int.from_bytes(mid, "big")]
                self.request = self.delivery.next_page(self.now)
                if self.request is None:
                    break
            self.read_page()
            self.hand_back_page()
        pushed = {each.seq for each in self.pushed}
        assert set(self.queued) <= pushed
        assert not self.queued


TestDeliveryMachine = DeliveryMachine.TestCase
TestDeliveryMachine.settings = settings(max_examples=1000, stateful_step_count=30, deadline=None)
