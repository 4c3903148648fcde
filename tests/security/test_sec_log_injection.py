"""Attacks on the logs: a peer's ERROR code or text that forges log lines.

A hub logs the code of an ERROR an unauthenticated client sends; a client logs
the code and text of a hub's ERRORs. Both are peer-chosen strings: with a line
break in them, a peer could write lines of its choosing into the other side's
log ("FORGED ..."), e.g. fake login records. Codes must match ``[a-z_]{1,64}``
and texts be short and printable when parsed, and the logs quote them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from hubproc import HubProcess
from security_helpers import raw_frame, wait_until

from agentmesh.errors import HubError, HubUnavailableError
from agentmesh.hub.client import NetworkHub
from agentmesh.protocol import hub_protocol as hp
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Writer

pytestmark = pytest.mark.timeout(60)

#: What the attacker appends: a line break (of several kinds), then its own line.
BREAKS = ["\n", "\r", "\r\n", "\u2028", "\x85", "\x1c"]


def error_frame(code: str, text: str = "", *, fatal: bool, request_id: int = 0) -> bytes:
    """An ERROR frame with any code and text (the honest encoder refuses such codes)."""
    body = Writer().u32(request_id).u8(int(fatal)).bytes8(code.encode()).bytes8(b"")
    return raw_frame(f.Error.TYPE, body.bytes16(text.encode()).getvalue())


def forged_lines(text: str) -> list[str]:
    """Lines of ``text`` (split at every line boundary Python knows) that start with FORGED."""
    return [line for line in text.splitlines() if line.startswith("FORGED")]


def test_error_from_an_unauthenticated_client__hub_log_integrity(
    start_hub: Callable[..., HubProcess],
) -> None:
    """Hub log integrity: an ERROR whose code or text carries a line break and a
    forged line, sent by a client that never logged in, adds no line of the
    client's choosing to the hub's log."""
    hub = start_hub()
    payloads = [error_frame(f"x{br}FORGED log line", fatal=True) for br in BREAKS]
    payloads += [error_frame("bad_frame", f"t{br}FORGED log line", fatal=True) for br in BREAKS]
    payloads.append(error_frame("x\nFORGED log line", fatal=False))
    before = hub.log().count("closing ")
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as sock:
            assert isinstance(f.FrameDecoder().feed(sock.recv(65536))[0], f.Hello)
            sock.sendall(payload)
            sock.settimeout(10)
            while sock.recv(65536):  # until the hub closes the connection
                pass
    wait_until(
        lambda: hub.log().count("closing ") >= before + len(payloads),
        what="the hub logged every refused connection",
    )
    assert forged_lines(hub.log()) == [], hub.log()


class FakeHub:
    """A hostile hub: greets each connection with a valid HELLO (naming the address
    the client dials), waits for the client's first request, then answers with the
    next payload and closes."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.payloads = payloads
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for payload in self.payloads:
            conn, _ = self.sock.accept()
            with conn:
                hello = f.Hello(
                    hp.PROTOCOL_VERSION, os.urandom(32), f"127.0.0.1:{self.port}", 1 << 20, 1 << 16
                )
                conn.settimeout(10)
                try:
                    conn.sendall(f.encode_frame(hello))
                    conn.recv(65536)  # the request: the client has taken the HELLO
                    conn.sendall(payload)
                    conn.shutdown(socket.SHUT_WR)  # FIN, not RST: the client reads it all
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def fake_hubs() -> Iterator[list[FakeHub]]:
    made: list[FakeHub] = []
    yield made
    for hub in made:
        hub.close()


def test_error_from_a_hostile_hub__client_log_integrity(
    fake_hubs: list[FakeHub], caplog: pytest.LogCaptureFixture
) -> None:
    """Client log integrity: ERRORs from a hub whose code or text carries a line
    break and a forged line (fatal or not, tied to the client's request or not)
    add no line of the hub's choosing to the client's log, and the exception the
    client raises spans one line."""
    payloads = [error_frame(f"x{br}FORGED log line", fatal=False) for br in BREAKS]
    payloads += [error_frame("internal", f"t{br}FORGED log line", fatal=False) for br in BREAKS]
    payloads += [error_frame(f"x{br}FORGED log line", fatal=True) for br in BREAKS]
    payloads += [error_frame("shutting_down", f"t{br}FORGED log line", fatal=True) for br in BREAKS]
    payloads.append(error_frame("internal", "t\nFORGED log line", fatal=True, request_id=1))
    fake = FakeHub(payloads)
    fake_hubs.append(fake)
    raised: list[BaseException] = []
    with caplog.at_level(logging.INFO, logger="agentmesh"):
        for _ in payloads:
            with NetworkHub(
                "127.0.0.1", fake.port, connect_timeout=5.0, request_timeout=5.0
            ) as hub:
                with pytest.raises((HubError, HubUnavailableError)) as failure:
                    hub.list_agents()
                raised.append(failure.value)
    records = [r for r in caplog.records if r.name.startswith("agentmesh.hub.client")]
    assert len(records) >= len(payloads)  # every hostile ERROR was logged, somehow
    assert forged_lines(caplog.text) == [], caplog.text
    assert [r.getMessage() for r in records if len(r.getMessage().splitlines()) != 1] == []
    assert [str(e) for e in raised if len(str(e).splitlines()) != 1] == []
