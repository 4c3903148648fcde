"""The contract between an Agent and a hub (in-process or over the network).

A hub routes opaque envelope bytes and publishes public prekey bundles; it
never sees keys or plaintext. ``Agent`` talks to any object with the
:class:`Hub` shape, and a hub talks back to the agent through the
:class:`HubEndpoint` shape that ``Agent`` implements.

Optional features are *capabilities*: a hub or an endpoint that has one
implements the matching protocol below, and callers test for it with
``isinstance`` (they are ``runtime_checkable``), so mypy checks every use.

No I/O here: these are typing protocols and small value types only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, TypeVar, runtime_checkable


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a hub learns when it hands an envelope to an endpoint.

    ``accepted``: the endpoint committed the message (or had already), so the
    hub may delete it. ``duplicate``: it had been committed before (a redelivery).
    """

    accepted: bool
    duplicate: bool = False


@runtime_checkable
class HubEndpoint(Protocol):
    """What a hub may call on a registered agent."""

    @property
    def agent_id(self) -> str: ...

    @property
    def signing_public_key(self) -> bytes:
        """The agent's raw 32-byte Ed25519 identity key (what the hub binds the id to)."""
        ...

    def sign_login(self, challenge: bytes) -> bytes:
        """Ed25519-sign a hub login challenge with the identity key."""
        ...

    def prekey_bundle_bytes(self) -> bytes:
        """The signed bundle to publish: identity, signed prekey, last-resort KEM prekey."""
        ...

    def one_time_prekeys(self) -> list[bytes]:
        """Encoded signed one-time prekeys not yet uploaded (the hub hands each out once)."""
        ...

    def one_time_prekeys_uploaded(self, encoded: list[bytes]) -> None:
        """The hub committed these one-time prekeys; don't upload them again."""
        ...

    def prekeys_low(self, remaining: int) -> None:
        """The hub reports the one-time pool is below its low-water mark."""
        ...

    def receive_envelope(self, data: bytes) -> DeliveryReport:
        """Decrypt and durably commit one envelope, then run the handlers.

        Returning means the hub may forget the envelope. Raising
        ``CryptoError``/``DecodeError`` means the envelope can never be
        processed (forged, tampered, replayed) and the recipient's state is
        unchanged.
        """
        ...

    def unacked_envelopes(self) -> list[bytes]:
        """Envelopes in the agent's outbox, oldest first, to (re)send after (re)connecting."""
        ...

    def envelope_acked(self, message_id: bytes) -> None:
        """The hub has durably stored the envelope with this id: drop it from the outbox."""
        ...


@runtime_checkable
class EndpointOwner(Protocol):
    """An object a hub reaches through its endpoint (an ``Agent``: version 1 code calls
    ``hub.register(agent)``)."""

    @property
    def endpoint(self) -> HubEndpoint: ...


def endpoint_of(agent: HubEndpoint | EndpointOwner) -> HubEndpoint:
    """The endpoint to talk to: ``agent.endpoint`` for an Agent, else ``agent`` itself."""
    if supports(agent, EndpointOwner):
        return agent.endpoint
    return agent  # type: ignore[return-value]


class Hub(Protocol):
    """What an Agent calls on its hub (the version 1 interface plus prekey upload).

    ``register`` takes the agent's endpoint (``Agent.endpoint``); hubs also accept the
    Agent itself, as version 1 code passes it (:func:`endpoint_of`)."""

    def register(self, agent: HubEndpoint) -> None: ...

    def unregister(self, agent_id: str) -> None: ...

    def deliver(self, envelope: bytes) -> None:
        """Store (and, where the recipient is online, push) one envelope.

        Returns only after the hub has durably accepted it. Raises
        ``MailboxFullError``/``HubError`` if refused, ``HubUnavailableError``
        if the hub cannot be reached.
        """
        ...

    def fetch_prekey_bundle(self, agent_id: str) -> bytes:
        """The peer's encoded bundle with at most one one-time prekey of each kind,
        which the hub hands out only once. Raises ``ValueError("Peer 'x' not found on hub")``.
        """
        ...

    def get_bundle(self, agent_id: str) -> dict[str, Any]:
        """Version 1: the peer's public bundle as a JSON-safe dict."""
        ...

    def list_agents(self) -> list[str]: ...

    def message_count(self) -> int: ...


# --- capabilities ---------------------------------------------------------------


@runtime_checkable
class PipelinedHub(Protocol):
    """A hub that accepts envelopes without a round trip each (``send(wait=False)``)."""

    def submit(self, envelope: bytes) -> None:
        """Hand over one envelope; its acknowledgement comes later (``envelope_acked``)."""
        ...

    def wait_acked(self, agent_id: str, timeout: float | None = None) -> bool:
        """Wait until every submitted envelope of ``agent_id`` is acknowledged or refused."""
        ...


@runtime_checkable
class RoutingHub(Protocol):
    """A synchronous hub that hands an envelope to its recipient inside the call
    (:class:`~agentmesh.LocalHub`) and keeps the recipient's verdict to itself."""

    def route(self, envelope: bytes) -> None:
        """Queue one envelope and hand it over; raises only the sender's errors."""
        ...

    def queued_count(self) -> int:
        """Envelopes queued for recipients that have not taken them yet."""
        ...


@runtime_checkable
class EnvelopeLimitedHub(Protocol):
    """A hub that announces the largest envelope it accepts (the network hub's HELLO)."""

    def envelope_limit(self, agent_id: str) -> int | None:
        """The limit announced on ``agent_id``'s connection, in bytes; None if unknown."""
        ...


@runtime_checkable
class BackgroundRegisteringHub(Protocol):
    """A hub an agent can register with while it is unreachable (the login happens
    when it comes back)."""

    def register_in_background(self, agent: HubEndpoint) -> None:
        """Register without waiting for the hub; never raises HubUnavailableError."""
        ...


@runtime_checkable
class LoopBoundHub(Protocol):
    """A hub whose connections run on the caller's event loop
    (:class:`~agentmesh.hub.async_client.AsyncNetworkHub`): an asyncio driver binds
    it to its loop before the first blocking call, which it then makes from another
    thread."""

    def bind_running_loop(self) -> None:
        """Drive the connections on the event loop running in the calling thread
        (idempotent for that loop). Raises ``LocalProtocolError`` without a running
        loop, or if the hub is bound to another loop or closed."""
        ...


@runtime_checkable
class PrekeyRefreshingHub(Protocol):
    """A hub an agent can tell about new prekeys between logins."""

    def refresh_prekeys(self, agent: HubEndpoint) -> None:
        """(Re)publish the agent's bundle and upload its new one-time prekeys."""
        ...


@runtime_checkable
class BatchEndpoint(Protocol):
    """An endpoint that commits several envelopes in one transaction, and takes
    several acknowledgements at once."""

    def receive_envelopes(self, items: list[bytes]) -> list[DeliveryReport | Exception]:
        """One outcome per envelope, in order: a report, or the error it would raise."""
        ...

    def envelopes_acked(self, message_ids: list[bytes]) -> None:
        """The hub stored these envelopes: drop them from the outbox."""
        ...


@runtime_checkable
class EphemeralCapableEndpoint(Protocol):
    """An endpoint that says whether its identity outlives the process."""

    @property
    def ephemeral_identity(self) -> bool:
        """True for an agent without a key file: its key dies with the process, so
        the hub binds its id ephemerally (docs/PROTOCOL.md, "Ephemeral ids")."""
        ...


def is_ephemeral(endpoint: object) -> bool:
    """Whether ``endpoint`` asks for an ephemeral binding (False if it cannot say)."""
    return supports(endpoint, EphemeralCapableEndpoint) and endpoint.ephemeral_identity


@runtime_checkable
class RefusalAwareEndpoint(Protocol):
    """An endpoint that wants to hear when the hub refused an envelope of its outbox,
    so that a refusal no resend can cure does not block the outbox for ever."""

    def envelope_refused(self, message_id: bytes, error: Exception) -> None:
        """The hub refused the envelope ``message_id`` with ``error`` (a ``HubError``
        carrying its code, or ``PeerNotFoundError``); the endpoint decides whether to
        keep it for a resend or to move it out of the outbox."""
        ...


@runtime_checkable
class NoticingEndpoint(Protocol):
    """An endpoint that wants to hear which refused envelopes came from whom, to tell
    a sender that holds a session it cannot read (a session notice)."""

    def unreadable_envelope(self, sender: str, error: Exception) -> None:
        """The hub delivered an envelope from ``sender`` (authenticated by the hub) and
        the endpoint refused it with ``error``. Called with no lock held, after the
        hub has forgotten the envelope."""
        ...


@runtime_checkable
class DispatchingEndpoint(Protocol):
    """An endpoint whose message handlers a hub runs after handing envelopes over."""

    def dispatch_pending(self) -> int:
        """Run the handlers for committed, unhandled messages; return how many."""
        ...


@runtime_checkable
class HandlingEndpoint(Protocol):
    """An endpoint that takes an envelope and runs its handlers in one call.

    For a hub that delivers synchronously in the endpoint's own process: once the
    handlers have run before the call returns, the endpoint's commit need not wait
    for the disk (the endpoint makes it durable if they could not run).
    """

    def receive_and_handle(self, data: bytes) -> DeliveryReport:
        """Decrypt and commit one envelope, run the handlers, and return once the
        message is handled or durable. Raises what ``receive_envelope`` raises."""
        ...


_C = TypeVar("_C")
#: (type of the object, capability) -> whether it has it: isinstance against a
#: runtime-checkable Protocol inspects every member (about 10 µs), and the agent asks
#: on every send.
_SUPPORTED: dict[tuple[type, type], bool] = {}


def supports(obj: object, capability: type[_C]) -> TypeGuard[_C]:
    """Whether ``obj`` has ``capability`` (one of the protocols above), decided once
    per type. Capabilities are methods of the class, so the answer is the type's."""
    key = (type(obj), capability)
    found = _SUPPORTED.get(key)
    if found is None:
        found = _SUPPORTED[key] = isinstance(obj, capability)
    return found
