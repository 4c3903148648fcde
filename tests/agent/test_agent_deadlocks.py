"""The two deadlocks that public calls alone could reach (issue: agent core split).

Each scenario runs in worker threads under a watchdog: a deadlock shows as
threads still alive after the watchdog's limit, and the test fails instead of
hanging the suite. The limit only bounds a hang; nothing here measures speed.

1. ``Agent.close()`` against a handler that sends: close held the agent's state
   lock while it waited for the running handler, and the handler's ``send``
   waited for the state lock.
2. ``LocalHub.register`` against a prekey top-up: ``register`` held the hub lock
   and called into the agent (``prekey_bundle_bytes``), while the top-up held the
   agent lock and called into the hub (``refresh_prekeys``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from agentmesh import Agent, LocalHub, Message

pytestmark = pytest.mark.timeout(120)

#: A bound on a hang, not a speed target: the scenarios finish in well under a second.
WATCHDOG_S = 30.0


def _run_all(*targets: Callable[[], None]) -> list[BaseException]:
    """Run ``targets`` in threads; fail if any is still running after the watchdog."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=guarded(t), name=f"deadlock-test-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WATCHDOG_S)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"deadlock: {stuck} still running after {WATCHDOG_S} s"
    return errors


def test_close_while_a_handler_sends_does_not_deadlock(agents) -> None:
    """close() from another thread while a handler is sending: both finish, and the
    handler's message is delivered."""
    hub = LocalHub()
    alice = agents("alice", hub=hub)
    bob = Agent("bob", hub=hub)
    got: list[str] = []
    alice.on_message(lambda m: got.append(m.text))
    handler_running = threading.Event()
    close_called = threading.Event()

    def handler(msg: Message) -> None:
        handler_running.set()
        close_called.wait(WATCHDOG_S)
        # Give close() time to get as far as it goes before this send: with the old
        # lock order it then holds the state lock and waits for this handler.
        threading.Event().wait(0.3)
        bob.send("alice", text=f"re: {msg.text}")

    bob.on_message(handler)

    def send() -> None:
        alice.send("bob", text="ping")

    def close() -> None:
        handler_running.wait(WATCHDOG_S)
        close_called.set()
        bob.close()

    assert _run_all(send, close) == []
    assert got == ["re: ping"]


def test_register_against_a_prekey_top_up_does_not_deadlock(agents) -> None:
    """One thread re-registers bob on the hub while another fetches bob's bundle (which
    tells bob its pool is low, so bob tops up and publishes): both finish."""
    hub = LocalHub()
    bob = agents("bob", hub=hub, prekey_pool_size=2)
    agents("alice", hub=hub)

    def register() -> None:
        for _ in range(200):
            hub.register(bob)

    def fetch() -> None:
        for _ in range(200):
            hub.fetch_prekey_bundle("bob")

    assert _run_all(register, fetch) == []
