"""Machinery of the attack suite (imported by name: tests/security is no package).

The hub subprocess (:class:`hubproc.HubProcess`), the raw protocol client
(:class:`hubproc.RawClient`) and :class:`agentkit.Inbox` are shared with the rest
of the tests; what is here only the attacks need:

* helpers to read what the hub sends on a raw socket and to write hand-made
  frames that the honest encoder would refuse to produce.
* :class:`InterceptHub` / :class:`TapHub`: a LocalHub and a NetworkHub that
  record (and, for LocalHub, can hold back) every envelope an agent hands them,
  i.e. a network capture.
* :class:`RecordingAgent`: an Agent that records what its ``receive_envelope``
  answered (a report or an exception) for every envelope, from construction on.
* :func:`state_dump`: every row of an agent's state file, read from the file, so
  "no state change" is checked on what is durable, not on objects in memory.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hubproc

from agentmesh import Agent, LocalHub
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.hub.client import NetworkHub
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.state import state_path_for
from agentmesh.wire import frames as f
from agentmesh.wire.codec import Writer
from agentmesh.wire.envelope import Envelope, RatchetHeader, decode_envelope, encode_header

STATE_TABLES = ("meta", "sessions", "peers", "seen", "inbox", "outbox")


def wait_until(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """:func:`hubproc.wait_until` with the attack suite's own default bound."""
    hubproc.wait_until(condition, timeout, what)


class TapHub(NetworkHub):
    """A NetworkHub that keeps a copy of every envelope its agents send (a wire capture)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[bytes] = []

    def deliver(self, envelope: bytes) -> None:
        self.captured.append(bytes(envelope))
        super().deliver(envelope)


# --- the attacker's raw connection (see hubproc.RawClient) ----------------------


def fatal_code(event: hp.Event) -> str:
    """The code of a fatal refusal (the hub closed the connection), else AssertionError."""
    if isinstance(event, hp.ErrorReceived) and event.fatal:
        return event.code
    if isinstance(event, hp.ConnectionFailed) and event.sent_by_peer:
        return event.code
    raise AssertionError(f"not a fatal refusal by the hub: {event!r}")


def frames_until_eof(sock: socket.socket, timeout: float = 10.0) -> list[f.Frame]:
    """Every frame the hub sends until it closes the connection (or ``timeout``)."""
    decoder = f.FrameDecoder(max_frame_size=1 << 24)
    out: list[f.Frame] = []
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        out += decoder.feed(data)
    return out


def raw_frame(frame_type: int, body: bytes) -> bytes:
    """A frame with any body, bypassing the encoder's checks."""
    return (len(body) + 1).to_bytes(4, "big") + bytes((frame_type,)) + body


def login_frame_for(agent_id_bytes: bytes, nonce: bytes, hub_address: str) -> bytes:
    """A LOGIN frame for an id the encoder would refuse (signed over the same bytes)."""
    identity = IdentityKeyPair.generate()
    challenge = Writer().raw(hp.LOGIN_CONTEXT).raw(nonce)
    challenge.u8(len(agent_id_bytes)).raw(agent_id_bytes).str8(hub_address)
    signature = identity.sign(challenge.getvalue())
    body = Writer().u32(1).u16(hp.PROTOCOL_VERSION).u8(len(agent_id_bytes)).raw(agent_id_bytes)
    body.raw(identity.public.signing).raw(signature).bytes32(b"")
    return raw_frame(f.Login.TYPE, body.getvalue())


# --- agents --------------------------------------------------------------------


class RecordingAgent(Agent):
    """An Agent that records ``(message_id, report or exception)`` for every envelope it
    is handed, one at a time (``receive_envelope``) or in batches (``receive_envelopes``),
    from construction on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reports: list[tuple[bytes, DeliveryReport | BaseException]] = []
        self._nested = threading.local()
        super().__init__(*args, **kwargs)

    @staticmethod
    def _message_id(data: bytes) -> bytes:
        try:
            return decode_envelope(bytes(data)).message_id
        except Exception:  # the agent itself reports the parse error
            return b""

    # The hub reaches these through ``agent.endpoint`` (AgentEndpoint delegates here).
    def _receive_envelope(self, data: bytes) -> DeliveryReport:
        self._nested.active = True
        try:
            report = super()._receive_envelope(data)
        except BaseException as exc:
            self.reports.append((self._message_id(data), exc))
            raise
        finally:
            self._nested.active = False
        self.reports.append((self._message_id(data), report))
        return report

    def _receive_envelopes(self, items: list[bytes]) -> list[DeliveryReport | Exception]:
        outcomes: list[DeliveryReport | Exception] = super()._receive_envelopes(items)
        if not getattr(self._nested, "active", False):
            for data, outcome in zip(items, outcomes, strict=True):
                self.reports.append((self._message_id(data), outcome))
        return outcomes

    def verdicts(self, message_id: bytes) -> list[DeliveryReport | BaseException]:
        return [outcome for mid, outcome in self.reports if mid == message_id]


class InterceptHub(LocalHub):
    """A LocalHub that records every envelope handed to ``deliver``; with ``hold`` set
    it records without passing them on (the attacker has them, the recipient not yet)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.envelopes: list[bytes] = []
        self.hold = False

    def deliver(self, envelope: bytes | Envelope) -> None:
        data = envelope.to_bytes() if isinstance(envelope, Envelope) else bytes(envelope)
        self.envelopes.append(data)
        if not self.hold:
            super().deliver(data)

    def route(self, envelope: bytes) -> None:  # what an Agent's send calls
        self.envelopes.append(bytes(envelope))
        if not self.hold:
            super().route(envelope)

    def inject(self, data: bytes) -> None:
        """Deliver bytes the attacker chose (not recorded)."""
        LocalHub.deliver(self, data)

    def capture(self, send: Callable[[], object]) -> bytes:
        """Run ``send`` with delivery held back; return the one envelope it produced."""
        before = len(self.envelopes)
        self.hold = True
        try:
            send()
        finally:
            self.hold = False
        [data] = self.envelopes[before:]
        return data


def state_dump(key_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the agent state belonging to ``key_path``."""
    conn = sqlite3.connect(state_path_for(key_path), timeout=10)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            for table in STATE_TABLES
        }
    finally:
        conn.close()


# --- envelope surgery ----------------------------------------------------------


def field_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte range of every envelope field (docs/PROTOCOL.md, "Envelope")."""
    env = decode_envelope(data)
    s, r = len(env.sender.encode()), len(env.recipient.encode())
    spans = {
        "version": (0, 1),
        "kind": (1, 2),
        "message_id": (2, 18),
        "timestamp": (18, 26),
        "sender": (26, 27 + s),
        "recipient": (27 + s, 28 + s + r),
        "ratchet_key": (28 + s + r, 60 + s + r),
        "pn": (60 + s + r, 64 + s + r),
        "n": (64 + s + r, 68 + s + r),
    }
    h = 68 + s + r
    if env.prekey is not None:
        spans["session_flags"] = (h, h + 1)
        h += 1
        spans.update(
            identity_signing=(h, h + 32),
            identity_exchange=(h + 32, h + 64),
            identity_binding=(h + 64, h + 128),
            ephemeral=(h + 128, h + 160),
            signed_prekey_id=(h + 160, h + 164),
            kem_prekey_id=(h + 164, h + 168),
            kem_ciphertext=(h + 168, h + 1256),
            one_time_prekey_flag=(h + 1256, h + 1257),
        )
        if env.prekey.one_time_prekey_id is not None:
            spans["one_time_prekey_id"] = (h + 1257, h + 1261)
    header = len(env.header_bytes)
    assert header == max(end for _, end in spans.values())
    spans["ciphertext_length"] = (header, header + 4)
    spans["ciphertext"] = (header + 4, len(data) - 16)
    spans["tag"] = (len(data) - 16, len(data))
    return spans


def reheader(data: bytes, **changes: Any) -> bytes:
    """Re-encode the envelope's header with ``changes`` and keep its ciphertext.

    Keys: ``sender``, ``recipient``, ``message_id``, ``timestamp``, ``dh``, ``pn``,
    ``n``, ``prekey`` (a PrekeyMessage or None) and ``ciphertext``.
    """
    env = decode_envelope(data)
    ratchet = RatchetHeader(
        changes.get("dh", env.ratchet.dh),
        changes.get("pn", env.ratchet.pn),
        changes.get("n", env.ratchet.n),
    )
    header = encode_header(
        changes.get("message_id", env.message_id),
        changes.get("timestamp", env.timestamp),
        changes.get("sender", env.sender),
        changes.get("recipient", env.recipient),
        ratchet,
        changes.get("prekey", env.prekey),
    )
    ciphertext = changes.get("ciphertext", env.ciphertext)
    return header + len(ciphertext).to_bytes(4, "big") + ciphertext


def junk_envelope(sender: str, recipient: str, size: int = 64) -> bytes:
    """A well-formed envelope with random ciphertext (what a flooder sends)."""
    ratchet = RatchetHeader(os.urandom(32), 0, 0)
    now = int(time.time() * 1000)
    header = encode_header(os.urandom(16), now, sender, recipient, ratchet, None)
    return header + size.to_bytes(4, "big") + os.urandom(size)
