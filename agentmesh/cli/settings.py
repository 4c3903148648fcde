"""What the global options name: the agent, its key file, its hub; and how to open them.

Shared by the ``agentmesh`` commands and ``agentmesh mcp``, so both open an identity
the same way. Imports the agent side and ``NetworkHub``; never click or mcp.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentmesh.agent import Agent
from agentmesh.cli.output import IdentityUnavailableError
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.errors import AuthenticationError, ConfigurationError
from agentmesh.hub.client import DEFAULT_PORT, NetworkHub
from agentmesh.ids import validate_agent_id
from agentmesh.keyfile import decode_key_file
from agentmesh.protocol.hub_protocol import parse_hub_address

#: Where a key file lives when ``--keypair`` is not given: ``~/.agentmesh/<id>.json``.
DEFAULT_KEY_DIR = Path("~/.agentmesh")


@dataclass(frozen=True)
class Settings:
    """The global options, after their environment variables were read."""

    agent_id: str | None = None
    keypair: Path | None = None
    #: ``HOST:PORT`` names, in failover order (canonical form).
    hubs: tuple[str, ...] = ()
    tls: bool = False
    ca_file: Path | None = None
    passphrase_env: str | None = None
    log_level: int = logging.ERROR

    def require_id(self) -> str:
        if self.agent_id is None:
            raise ConfigurationError("no agent id: pass --id NAME or set AGENTMESH_ID")
        return validate_agent_id(self.agent_id)

    @property
    def key_path(self) -> Path:
        """The key file: ``--keypair``, else ``~/.agentmesh/<id>.json``."""
        if self.keypair is not None:
            return self.keypair.expanduser()
        return (DEFAULT_KEY_DIR / f"{self.require_id()}.json").expanduser()

    def passphrase(self) -> str | None:
        """The key file's passphrase, read from the variable ``--passphrase-env`` names."""
        if self.passphrase_env is None:
            return None
        value = os.environ.get(self.passphrase_env)
        if not value:
            raise ConfigurationError(
                f"--passphrase-env {self.passphrase_env}: that environment variable is not set"
            )
        return value

    @property
    def hub_label(self) -> str | None:
        """The hub names as configured (``h1:7700,h2:7700``), or None."""
        return ",".join(self.hubs) if self.hubs else None

    def tls_setting(self) -> bool | Path:
        """NetworkHub's ``tls``: a CA file (a private CA: the hub is verified against
        it, hostname included), else whether to use TLS with the system's CAs."""
        return self.ca_file if self.ca_file is not None else self.tls


def parse_hubs(text: str | None) -> tuple[str, ...]:
    """``--hub``: one ``HOST:PORT`` or a comma-separated list (PORT defaults to 7700)."""
    if not text:
        return ()
    names = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(parse_hub_address(name, DEFAULT_PORT) for name in names)
    except ValueError as exc:
        raise ConfigurationError(f"--hub: {exc}") from exc


def open_hub(settings: Settings) -> NetworkHub:
    """A ``NetworkHub`` for the configured hubs (no connection yet)."""
    if not settings.hubs:
        raise ConfigurationError("no hub: pass --hub HOST:PORT or set AGENTMESH_HUB")
    # Failover: NetworkHub dials the names in order and moves on when one is down.
    return NetworkHub(servers=list(settings.hubs), tls=settings.tls_setting())


def load_keypair(settings: Settings) -> AgentKeyPair:
    """Read the key file without opening the state (``whoami`` works while another
    process, such as ``agentmesh mcp``, holds the identity)."""
    path = settings.key_path
    _require_key_file(path)
    try:
        return decode_key_file(path.read_bytes(), settings.passphrase())
    except (ConfigurationError, AuthenticationError) as exc:
        raise _key_file_error(path, exc) from exc


def _require_key_file(path: Path) -> None:
    if not path.is_file():
        # Never create one implicitly: a mistyped --id would mint a new identity.
        raise IdentityUnavailableError(
            f"no key file at {path}: create it with 'agentmesh --id NAME keygen' "
            "(or pass --keypair PATH)"
        )


def _key_file_error(path: Path, exc: Exception) -> Exception:
    if isinstance(exc, AuthenticationError):  # the key file's AES-GCM tag
        return IdentityUnavailableError(f"key file {path}: wrong passphrase or corrupted file")
    if "encrypted" in str(exc):
        return IdentityUnavailableError(
            f"key file {path} is encrypted: pass --passphrase-env NAME, the environment "
            "variable that holds its passphrase"
        )
    return exc


@contextlib.contextmanager
def open_agent(settings: Settings, *, with_hub: bool) -> Iterator[Agent]:
    """The agent of an existing key file, registered with the hub if ``with_hub``;
    closed (and its hub connection with it) at the end of the block."""
    agent_id = settings.require_id()
    path = settings.key_path
    _require_key_file(path)
    hub = open_hub(settings) if with_hub else None
    try:
        try:
            agent = Agent(
                agent_id,
                hub=hub,
                keypair_path=path,
                log_level=settings.log_level,
                passphrase=settings.passphrase(),
            )
        except (ConfigurationError, AuthenticationError) as exc:
            raise _key_file_error(path, exc) from exc
        with agent:
            yield agent
    finally:
        if hub is not None:
            hub.close()


def agent_options(settings: Settings) -> dict[str, object]:
    """``Agent`` keyword arguments for ``AsyncAgent`` (``agentmesh mcp``); checks that
    the key file exists first."""
    path = settings.key_path
    _require_key_file(path)
    return {
        "keypair_path": path,
        "log_level": settings.log_level,
        "passphrase": settings.passphrase(),
    }
