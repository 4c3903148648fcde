"""Shared test support: a real ``agentmesh.hub_server`` subprocess, a raw protocol
client, and polling helpers.

Importable from any test because ``tests/conftest.py`` puts this folder on
``sys.path`` (pytest's default "prepend" import mode). Waits are bounded
polls, never timing assertions.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import agentmesh
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.hub.client import NetworkHub
from agentmesh.protocol import hub_protocol as hp

ROOT = Path(agentmesh.__file__).resolve().parents[1]
LISTENING = re.compile(r"hub listening on 127\.0\.0\.1:(\d+)")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what or condition}")
        time.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a hub that must keep its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the hub subprocess ------------------------------------------------------


class HubProcess:
    """``python -m agentmesh.hub_server`` on 127.0.0.1, logging to a file in ``workdir``.

    ``port=0`` lets the hub choose; a restart (``start`` again) keeps the port it
    got. ``db`` is relative to ``workdir`` (``None``: no ``--db`` flag), or a
    database URL (``postgresql+psycopg://...``), kept as :attr:`db_url`. ``stop``
    kills the hub; with ``graceful_stop`` it sends SIGTERM (a clean shutdown)
    and kills only if that takes more than 15 s. ``env`` is added to the hub's
    environment.
    """

    count = 0

    def __init__(
        self,
        workdir: Path,
        *args: str,
        db: str | None = "hub.sqlite",
        port: int = 0,
        log_level: str = "INFO",
        graceful_stop: bool = False,
        **env: str,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.args = list(args)
        self.db_url = db if db and "://" in db else None
        self.db = workdir / db if db and self.db_url is None else None
        self.port = port
        self.log_level = log_level
        self.graceful_stop = graceful_stop
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        HubProcess.count += 1
        self.log_path = workdir / f"hub-{HubProcess.count}.log"

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "agentmesh.hub_server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", self.log_level, *self.args]
        if self.db is not None or self.db_url is not None:
            cmd += ["--db", self.db_url or str(self.db)]
        return cmd

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.workdir
            )

    def start(self) -> HubProcess:
        offset = len(self.log())
        self.proc = self._spawn()
        deadline = time.monotonic() + 30
        while True:
            found = LISTENING.search(self.log()[offset:])
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"hub did not start:\n{self.log()}")
            time.sleep(0.02)

    def run_to_exit(self) -> int:
        return self._spawn().wait(30)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if not self.alive:
            return
        if self.graceful_stop:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(15)
                return
        self.kill()

    def client(self, cls: type[NetworkHub] = NetworkHub, **options: Any) -> NetworkHub:
        settings: dict[str, Any] = {
            "connect_timeout": 5.0,
            "ack_timeout": 10.0,
            "reconnect_initial": 0.05,
            "reconnect_max": 0.3,
        }
        settings.update(options)
        return cls("127.0.0.1", self.port, **settings)

    # What the hub's operator can see: its database and its files.

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one read statement on the hub database."""
        assert self.db is not None
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return list(conn.execute(sql, args))
        finally:
            conn.close()

    def queued_for(self, agent_id: str) -> int:
        sql = "SELECT COUNT(*) FROM envelopes WHERE recipient = ?"
        return int(self.query(sql, (agent_id,))[0][0])

    def files_bytes(self) -> bytes:
        """The database file with its WAL and shared memory, and the log: all an operator has."""
        assert self.db is not None
        parts = [p.read_bytes() for p in sorted(self.workdir.glob(self.db.name + "*"))]
        return b"".join(parts) + self.log_path.read_bytes()


# --- a raw protocol client -----------------------------------------------------


class RawClient:
    """A blocking socket driving the sans-IO ClientConnection (for protocol-level abuse)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = hp.ClientConnection()
        self.events: list[hp.Event] = []

    def pump_until(self, done: Callable[[list[hp.Event]], bool]) -> list[hp.Event]:
        while not done(self.events):
            data = self.sock.recv(65536)
            if not data:
                break
            self.events += self.conn.receive_data(data)
            self.flush()
        return self.events

    def hello(self) -> hp.HelloReceived:
        self.pump_until(lambda events: any(isinstance(e, hp.HelloReceived) for e in events))
        return next(e for e in self.events if isinstance(e, hp.HelloReceived))

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def login(self, agent_id: str, identity: IdentityKeyPair, bundle: bytes = b"") -> hp.Event:
        self.hello()
        signature = identity.sign(self.conn.login_challenge(agent_id))
        return self.answer(self.conn.login(agent_id, identity.public.signing, signature, bundle))

    def answer(self, request_id: int) -> hp.Event:
        """The answer to ``request_id``, or the ConnectionFailed that came instead."""

        def answered(events: list[hp.Event]) -> bool:
            return any(getattr(e, "request_id", None) == request_id for e in events) or any(
                isinstance(e, hp.ConnectionFailed) for e in events
            )

        self.flush()
        events = self.pump_until(answered)
        for event in events:
            if getattr(event, "request_id", None) == request_id:
                return event
        return next(e for e in events if isinstance(e, hp.ConnectionFailed))

    def close(self) -> None:
        self.sock.close()


def write_pem(cert: Any, key: Any, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    """Write an ``x509.Certificate`` and its private key as PEM files (TLS tests)."""
    from cryptography.hazmat.primitives import serialization

    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def self_signed_pem(folder: Path) -> tuple[Path, Path]:
    """``hub.crt`` and ``hub.key`` in ``folder``: a CA-flagged self-signed certificate for
    ``localhost`` and 127.0.0.1 (a private CA of one, for TLS tests)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return write_pem(cert, key, folder / "hub.crt", folder / "hub.key")
