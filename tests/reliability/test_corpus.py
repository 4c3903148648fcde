"""Replay the regression corpus: every input that ever broke something.

``corpus/`` holds one file per input, named ``<target>-<what>__<what it raised>``
(``.gz`` files are gzip-compressed). Every file is replayed against the frame
decoder, the hub's connection state machine (before and after login) and a
live hub process (on an anonymous and on a logged-in connection); the hub must
stay up, log no traceback and still answer. Files named ``state-*`` are also
opened as an agent's state file, which must fail with ``DecodeError`` only.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_hub import Inputs, Report, Scenario, _connection
from hubproc import HubProcess

from agentmesh import Agent
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.keypair import AgentKeyPair
from agentmesh.errors import AgentMeshError, DecodeError
from agentmesh.keyfile import encode_key_file
from agentmesh.protocol import hub_protocol as hp
from agentmesh.state import AgentState
from agentmesh.wire import frames as f

CORPUS = Path(__file__).with_name("corpus")
NAMES = sorted(p.name for p in CORPUS.iterdir() if p.is_file() and p.name != "README.md")


def load(name: str) -> bytes:
    data = (CORPUS / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def test_corpus_is_not_empty() -> None:
    assert NAMES


@pytest.mark.parametrize("name", NAMES)
def test_corpus_against_the_frame_decoder(name: str) -> None:
    data = load(name)
    for step in (max(1, len(data)), 1, 7, 4096):
        decoder = f.FrameDecoder()
        try:
            for i in range(0, len(data), step):
                for frame in decoder.feed(data[i : i + step]):
                    assert isinstance(frame, f.Frame)
        except DecodeError:
            pass


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("logged_in", [False, True])
def test_corpus_against_the_hub_state_machine(name: str, logged_in: bool) -> None:
    server = hp.ServerConnection(nonce=bytes(32), hub_address="hub:1", max_envelope_bytes=4096)
    if logged_in:
        identity = IdentityKeyPair.generate()
        client = hp.ClientConnection()
        client.receive_data(server.data_to_send())
        client.login(
            "alice", identity.public.signing, identity.sign(client.login_challenge("alice"))
        )
        assert isinstance(server.receive_data(client.data_to_send())[0], hp.LoginRequested)
        server.accept_login(created=True)
    for event in server.receive_data(load(name)):
        assert isinstance(event, hp.Event)
    server.data_to_send()


@pytest.fixture(scope="module")
def live_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path_factory.mktemp("corpus-hub"))
    hub.start()
    yield hub
    hub.stop()


def test_corpus_against_a_live_hub(live_hub: HubProcess) -> None:
    inputs = Inputs(seed=0)
    report = Report(seed=0)
    for name in NAMES:
        for login_as in (None, "fuzz-0"):
            scenario = Scenario("corpus", [load(name)], login_as)
            asyncio.run(_connection(live_hub.port, inputs, scenario, report))
            assert live_hub.proc is not None and live_hub.proc.poll() is None, name
    client = live_hub.client()
    try:
        assert client.stats()["agents"] >= 1  # fuzz-0 logged in: the hub still works
    finally:
        client.close()
    assert "Traceback" not in live_hub.log(), live_hub.log()[-3000:]


STATE_NAMES = [n for n in NAMES if n.startswith("state-")]


@pytest.mark.parametrize("name", STATE_NAMES)
def test_state_corpus_raises_decode_error_only(name: str, tmp_path: Path) -> None:
    state_file = tmp_path / "alice.state.sqlite"
    state_file.write_bytes(load(name))
    with pytest.raises(DecodeError, match="damaged or not an AgentMesh state file"):
        AgentState(state_file)
    (tmp_path / "alice.json").write_bytes(encode_key_file(AgentKeyPair.generate()))
    for _ in range(2):  # the identity lock is released after the failure
        with pytest.raises(AgentMeshError) as caught:
            Agent("alice", keypair_path=tmp_path / "alice.json")
        assert isinstance(caught.value, DecodeError), caught.value
