"""Attacks by a hub on its own agents: relaying an agent's login to another hub.

A malicious hub M that an agent dials (over TLS with M's own valid
certificate, or over plain TCP) forwards the agent's bytes to a real hub H to
log in there as the agent. Version 2 of the hub protocol binds every login to
the name the agent dialled and to the TLS certificate it verified; H refuses a
login made for anything else, and the agent refuses a hub that does not
answer to the name it dialled.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hubproc import ROOT, HubProcess, unique, write_pem

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.errors import AuthFailedError
from agentmesh.hub.client import NetworkHub
from agentmesh.protocol import hub_protocol as hp
from agentmesh.protocol.hub_interface import DeliveryReport
from agentmesh.wire import frames as f

pytestmark = pytest.mark.timeout(60)

#: The TLS name both the real hub and the relay have a valid certificate for.
NAME = "hub.test"


# --- a certificate authority the agents trust --------------------------------


class TestCA:
    """A CA trusted by the agents, issuing certificates for :data:`NAME` (to H and M alike)."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AgentMesh test CA")])
        self.name = subject
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str) -> tuple[Path, Path]:
        """A fresh key and a certificate for :data:`NAME`, localhost and 127.0.0.1 (PEM files)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(NAME),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return write_pem(cert, key, self.folder / f"{label}.crt", self.folder / f"{label}.key")

    def client_context(self) -> ssl.SSLContext:
        """What an agent uses: verify hubs against this CA (and check the name)."""
        return ssl.create_default_context(cafile=str(self.path))


# --- the malicious hub ---------------------------------------------------------


class Relay:
    """A malicious hub M on 127.0.0.1: forwards every byte between an agent and hub H.

    ``tls``: M terminates the agent's TLS with its own certificate ``(cert, key)``
    and opens its own TLS connection to H (verified with ``upstream_tls``). With
    ``announce_itself`` it rewrites H's HELLO to list M's own address instead (a
    hub may call itself anything); everything else passes untouched. It records the frames
    the agent sent (M sees them in the clear), notably the LOGINs it forwarded.
    """

    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        upstream_tls: ssl.SSLContext | None = None,
        announce_itself: bool = False,
    ) -> None:
        self.target_port = 0
        self.announce_itself = announce_itself
        self.upstream_tls = upstream_tls
        self.forwarded: list[f.Frame] = []
        self._server_tls: ssl.SSLContext | None = None
        if tls is not None:
            self._server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._server_tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._server_tls)

    async def _relay(self, agent_in: asyncio.StreamReader, agent_out: asyncio.StreamWriter) -> None:
        hub_in, hub_out = await asyncio.open_connection(
            "127.0.0.1",
            self.target_port,
            ssl=self.upstream_tls,
            server_hostname=NAME if self.upstream_tls else None,
        )
        await asyncio.gather(
            self._pipe(hub_in, agent_out, rewrite=self.announce_itself),
            self._pipe(agent_in, hub_out, record=True),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        rewrite: bool = False,
        record: bool = False,
    ) -> None:
        decoder = f.FrameDecoder(max_frame_size=1 << 24)
        try:
            if rewrite:
                length = await source.readexactly(4)
                body = await source.readexactly(int.from_bytes(length, "big"))
                hello = f.decode_frame(body[0], body[1:])
                assert isinstance(hello, f.Hello)
                sink.write(
                    f.encode_frame(
                        f.Hello(
                            hello.version,
                            hello.nonce,
                            f"127.0.0.1:{self.port}",
                            hello.max_frame_size,
                            hello.max_envelope_bytes,
                        )
                    )
                )
            while data := await source.read(65536):
                if record:
                    self.forwarded += decoder.feed(data)
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    def logins(self) -> list[f.Login]:
        return [frame for frame in self.forwarded if isinstance(frame, f.Login)]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Victim:
    """A HubEndpoint with a real identity key and nothing else (no bundle, no prekeys)."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.identity = IdentityKeyPair.generate()
        self.signing_public_key = self.identity.public.signing

    def sign_login(self, challenge: bytes) -> bytes:
        assert challenge.startswith(hp.LOGIN_CONTEXT)
        return self.identity.sign(challenge)

    def prekey_bundle_bytes(self) -> bytes:
        return b""

    def one_time_prekeys(self) -> list[bytes]:
        return []

    def one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        pass

    def prekeys_low(self, remaining: int) -> None:
        pass

    def receive_envelope(self, data: bytes) -> DeliveryReport:
        return DeliveryReport(accepted=True)

    def unacked_envelopes(self) -> list[bytes]:
        return []

    def envelope_acked(self, message_id: bytes) -> None:
        pass


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


def _client(port: int, **options: object) -> NetworkHub:
    settings: dict[str, object] = {"connect_timeout": 5.0, "request_timeout": 5.0}
    settings.update(options)
    return NetworkHub("127.0.0.1", port, **settings)  # type: ignore[arg-type]


def _bound(hub: HubProcess, agent_id: str) -> bool:
    return bool(hub.query("SELECT 1 FROM agents WHERE agent_id = ?", (agent_id,)))


def test_tls_relay_with_its_own_valid_certificate__channel_binding(
    start_hub: Callable[..., HubProcess], ca: TestCA, relays: list[Relay]
) -> None:
    """Channel binding: a hub that terminates the agent's TLS with its own valid
    certificate (same name, same trusted CA) and relays the login untouched to the
    real hub over a TLS connection of its own gets that login refused by the real
    hub (``channel_binding_mismatch``), even when the name the agent dialled is one
    of the real hub's names; the agent's id is not bound there."""
    relay = Relay(tls=ca.issue("relay"), upstream_tls=ca.client_context())
    relays.append(relay)
    cert, key = ca.issue("hub")
    # The real hub also answers to the relay's name: only the channel binding is left.
    hub = start_hub(
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--hub-address",
        NAME,
        "--hub-address",
        f"{NAME}:{relay.port}",
    )
    relay.target_port = hub.port
    victim = Victim(unique("victim"))
    with _client(relay.port, tls=ca.client_context(), server_hostname=NAME) as agent_hub:
        with pytest.raises(AuthFailedError) as refused:
            agent_hub.register(victim)
    assert refused.value.code == "channel_binding_mismatch"
    [login] = relay.logins()  # the relay did hand the agent's login to the real hub
    assert login.hub_address == f"{NAME}:{relay.port}"
    assert not _bound(hub, victim.agent_id)
    assert "'channel_binding_mismatch'" in hub.log()
    assert f"{victim.agent_id} logged in" not in hub.log()


def test_plain_relay_on_another_port__address_binding(
    start_hub: Callable[..., HubProcess], relays: list[Relay]
) -> None:
    """Address binding: over plain TCP, a hub on another port that forwards the
    agent's bytes to the real hub is refused by the agent before it signs anything
    (the real hub's HELLO does not list the dialled name); if the relay rewrites the
    HELLO to list its own name, the login the agent signs names the relay, and the
    real hub refuses it (``wrong_hub``); the agent's id is never bound there."""
    hub = start_hub()
    victim = Victim(unique("victim"))

    untouched = Relay()
    relays.append(untouched)
    untouched.target_port = hub.port
    with _client(untouched.port) as agent_hub:
        with pytest.raises(AuthFailedError) as refused:
            agent_hub.register(victim)
    assert refused.value.code == "wrong_hub"
    assert f"127.0.0.1:{untouched.port}" in str(refused.value)
    assert untouched.logins() == []  # refused before signing: nothing reached the hub

    lying = Relay(announce_itself=True)
    relays.append(lying)
    lying.target_port = hub.port
    with _client(lying.port) as agent_hub:
        with pytest.raises(AuthFailedError) as refused:
            agent_hub.register(victim)
    assert refused.value.code == "wrong_hub"
    [login] = lying.logins()
    assert login.hub_address == f"127.0.0.1:{lying.port}"
    assert not _bound(hub, victim.agent_id)
    assert "'wrong_hub'" in hub.log()
    assert f"{victim.agent_id} logged in" not in hub.log()


def test_direct_logins_over_tls_and_plain_tcp__no_false_refusal(
    start_hub: Callable[..., HubProcess], ca: TestCA
) -> None:
    """No false refusal: an agent that dials the hub itself logs in, over TLS (by the
    name on the certificate) and over plain TCP (by any loopback name of a hub on
    127.0.0.1 without --hub-address)."""
    cert, key = ca.issue("hub")
    tls_hub = start_hub("--tls-cert", str(cert), "--tls-key", str(key), "--hub-address", NAME)
    victim = Victim(unique("tls"))
    with _client(tls_hub.port, tls=ca.client_context(), server_hostname=NAME) as agent_hub:
        agent_hub.register(victim)
        assert victim.agent_id in agent_hub.list_agents()
    assert _bound(tls_hub, victim.agent_id)

    plain_hub = start_hub()
    for host in ("127.0.0.1", "localhost"):
        victim = Victim(unique("plain"))
        with NetworkHub(host, plain_hub.port, connect_timeout=5.0) as agent_hub:
            agent_hub.register(victim)
        assert _bound(plain_hub, victim.agent_id)


def test_public_hub_started_without_a_name__explicit_hub_identity(tmp_path: Path) -> None:
    """Explicit hub identity: ``agentmesh-hub`` on a non-loopback ``--host`` without
    ``--hub-address`` refuses to start (exit 2, one line on stderr) instead of
    answering logins for a name it guessed."""
    command = [sys.executable, "-m", "agentmesh.hub_server", "--host", "0.0.0.0"]
    command += ["--port", "0", "--db", str(tmp_path / "hub.sqlite")]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--hub-address" in lines[0], result.stderr
    assert not (tmp_path / "hub.sqlite").exists()
