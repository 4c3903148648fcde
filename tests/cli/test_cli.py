"""``agentmesh``, run as a subprocess against a real hub subprocess: keys, sending,
listening, request/reply, the outbox, dead letters, trust, and the documented exit
codes with their one-line errors."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clikit import Cli, one_error_line
from hubproc import HubProcess, self_signed_pem, wait_until

from agentmesh import Agent, Message, __version__
from agentmesh.hub.client import NetworkHub

MESSAGE_FIELDS = {"sender", "text", "type", "payload", "timestamp", "message_id", "in_reply_to"}


@pytest.fixture
def python_agent(
    hub: HubProcess, agents: Callable[..., Agent], tmp_path: Path
) -> Iterator[Callable[..., Agent]]:
    """``python_agent("bob", **agent_kwargs)``: an in-process Agent on the hub."""
    clients: list[NetworkHub] = []

    def make(agent_id: str, **kwargs: Any) -> Agent:
        client = hub.client()
        clients.append(client)
        kwargs.setdefault("keypair_path", tmp_path / "py" / f"{agent_id}.json")
        return agents(agent_id, client, **kwargs)

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def shared_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """One hub and two agents, alice and bob (who have talked), for the error cases,
    none of which changes anything."""
    root = tmp_path_factory.mktemp("errors")
    process = HubProcess(root / "hub", graceful_stop=True).start()
    (root / "home").mkdir()
    cli = Cli(root / "home", process)
    ok(cli("--id", "alice", "keygen"))
    ok(cli("--id", "bob", "keygen"))
    ok(cli("--id", "alice", "send", "bob", "hi"))  # a pinned peer (bob) for trust
    yield cli
    process.stop()


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return str(result.stdout)


def test_version_prints_only_the_version_and_no_command_prints_the_help(cli: Cli) -> None:
    assert ok(cli("--version")) == f"{__version__}\n"
    bare = cli()
    assert bare.returncode == 2 and bare.stdout == ""
    assert bare.stderr.startswith("Usage: agentmesh") and "Exit codes:" in bare.stderr


def test_keygen_makes_a_0600_key_whoami_reads_and_a_second_keygen_refuses(cli: Cli) -> None:
    fingerprint = ok(cli("--id", "alice", "keygen")).strip()
    key = cli.key("alice")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(fingerprint.split(":")) == 8
    assert ok(cli("--id", "alice", "whoami")) == f"alice\t{fingerprint}\n"
    shown = json.loads(ok(cli("--id", "alice", "whoami", "--json")))
    assert cli.hub is not None
    assert shown == {"id": "alice", "fingerprint": fingerprint, "hub": f"127.0.0.1:{cli.hub.port}"}

    before = key.read_bytes()
    again = cli("--id", "alice", "keygen")
    assert again.returncode == 2 and "already exists" in one_error_line(again)
    assert key.read_bytes() == before
    # keygen with a hub registered the agent: its peers see it at once.
    ok(cli("--id", "bob", "keygen"))
    assert ok(cli("--id", "bob", "peers")).splitlines() == ["alice"]


def test_keygen_with_a_passphrase_and_the_exit_codes_of_a_locked_key(cli: Cli) -> None:
    ok(cli("--id", "carol", "--passphrase-env", "CAROL_PW", "keygen", CAROL_PW="s3cret"))
    assert json.loads(cli.key("carol").read_text())["format"] == "agentmesh-key-v2"
    missing = cli("--id", "carol", "whoami")
    assert missing.returncode == 7 and "--passphrase-env" in one_error_line(missing)
    wrong = cli("--id", "carol", "--passphrase-env", "CAROL_PW", "whoami", CAROL_PW="nope")
    assert wrong.returncode == 7 and "wrong passphrase" in one_error_line(wrong)
    assert ok(cli("--id", "carol", "whoami", AGENTMESH_PASSPHRASE_ENV="PW", PW="s3cret"))


def test_send_then_listen_prints_json_objects_and_safe_plain_lines(cli: Cli) -> None:
    ok(cli("--id", "alice", "keygen"))
    ok(cli("--id", "bob", "keygen"))
    first = ok(cli("--id", "alice", "send", "bob", "hello bob", "--data", '{"task": 7}')).strip()
    second = ok(cli("--id", "alice", "send", "bob", "-", "--no-wait", stdin="two\nlines\x1b[2J"))
    ok(cli("--id", "alice", "outbox", "retry"))  # --no-wait may leave it for the next run

    lines = ok(cli("--id", "bob", "listen", "--count", "1", "--json")).splitlines()
    assert len(lines) == 1
    message = json.loads(lines[0])
    assert set(message) == MESSAGE_FIELDS
    assert message["sender"] == "alice" and message["text"] == "hello bob"
    assert message["message_id"] == first and message["in_reply_to"] is None
    assert message["payload"] == {"type": "message", "text": "hello bob", "task": 7}
    assert message["type"] == "message" and isinstance(message["timestamp"], int)
    # Plain lines: one per message, terminal controls and newlines escaped.
    plain = ok(cli("--id", "bob", "listen", "--count", "1"))
    assert plain == "alice\ttwo\\nlines\\x1b[2J\n"
    assert second.strip() != first
    assert json.loads(ok(cli("--id", "bob", "status", "--json")))["inbox_pending"] == 0


def test_request_prints_the_reply_of_a_python_agent(
    cli: Cli, python_agent: Callable[..., Agent]
) -> None:
    ok(cli("--id", "alice", "keygen"))
    worker = python_agent("worker")

    @worker.on_message
    def answer(msg: Message) -> None:
        msg.reply(f"done: {msg.text}", score=msg.payload.get("n", 0) * 2)

    assert ok(cli("--id", "alice", "request", "worker", "job 1")) == "done: job 1\n"
    asked = cli("--id", "alice", "request", "worker", "x", "--json", "--data", '{"n": 4}')
    reply = json.loads(ok(asked))
    assert set(reply) == MESSAGE_FIELDS
    assert reply["sender"] == "worker" and reply["payload"]["score"] == 8
    assert reply["in_reply_to"] is not None
    number = ok(cli("--id", "alice", "safety-number", "worker")).strip()
    assert number == worker.safety_number("alice")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--id", "alice", "send", "nobody", "x"], 3, "Peer 'nobody' not found"),
        (["--id", "alice", "send", "bob", "x", "--data", "[1]"], 2, "JSON object"),
        (["--id", "alice", "send", "bob", "x", "--data", "{"], 2, "not valid JSON"),
        (["--id", "alice", "send", "bad id!", "x"], 2, "invalid agent id"),
        (["--id", "alice", "frobnicate"], 2, "No such command"),
        (["--id", "alice", "listen", "--count", "0"], 2, "--count"),
        (["send", "bob", "x"], 2, "--id"),
        (["--id", "nokey", "send", "bob", "x"], 7, "keygen"),
        (["--id", "alice", "safety-number", "carol"], 3, "carol"),
        (["--id", "alice", "trust", "bob", "0000:0000"], 3, "does not match"),
        (["--id", "alice", "dead-letters", "discard", "ab" * 16], 3, "no dead letter"),
        (["--id", "alice", "outbox", "discard", "ab" * 16], 3, "outbox"),
        (["--id", "alice", "outbox", "discard", "xyz"], 2, "32 hex digits"),
        (["--id", "alice", "request", "bob", "anyone?", "--timeout", "0.5"], 4, "no reply"),
        (["--id", "alice", "listen", "--timeout", "0.2"], 4, "no message"),
        (["--id", "alice", "--hub", "127.0.0.1:1", "peers"], 6, "cannot reach the hub"),
        (["--id", "alice", "--hub", "nohost:", "peers"], 2, "--hub"),
    ],
)
def test_errors_are_one_line_with_the_documented_exit_code(
    shared_cli: Cli, args: list[str], code: int, says: str
) -> None:
    result = shared_cli(*args)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert says in one_error_line(result)


def test_an_identity_held_by_another_process_is_exit_7(
    cli: Cli, python_agent: Callable[..., Agent]
) -> None:
    ok(cli("--id", "alice", "keygen"))
    python_agent("alice", keypair_path=cli.key("alice"))
    result = cli("--id", "alice", "peers")
    assert result.returncode == 7 and "agentmesh mcp" in one_error_line(result)
    assert ok(cli("--id", "alice", "whoami"))  # the key file alone is not locked


def test_outbox_lists_retries_and_discards_while_the_hub_is_down(cli: Cli, hub: HubProcess) -> None:
    ok(cli("--id", "alice", "keygen"))
    ok(cli("--id", "bob", "keygen"))
    ok(cli("--id", "alice", "send", "bob", "while up"))
    hub.stop()

    queued = cli("--id", "alice", "send", "bob", "while down")
    assert queued.returncode == 6 and "outbox" in one_error_line(queued)
    kept = queued.stdout.strip()
    asked = cli("--id", "alice", "request", "bob", "are you there?", "--timeout", "0.5")
    assert asked.returncode == 6 and "request" in one_error_line(asked)
    dropped = cli("--id", "alice", "send", "bob", "dropped").stdout.strip()
    rows = [line.split("\t") for line in ok(cli("--id", "alice", "outbox")).splitlines()]
    assert [row[1] for row in rows] == ["bob"] * 3
    assert rows[0][0] == kept and rows[2][0] == dropped
    assert json.loads(ok(cli("--id", "alice", "outbox", "--json")).splitlines()[0])["size"] > 0
    ok(cli("--id", "alice", "outbox", "discard", dropped))
    assert cli("--id", "alice", "outbox", "discard", dropped).returncode == 3
    late = cli("--id", "alice", "outbox", "retry", "--timeout", "0.5")
    assert late.returncode == 4 and "2 messages still wait" in one_error_line(late)

    hub.start()  # same port
    ok(cli("--id", "alice", "outbox", "retry"))
    assert ok(cli("--id", "alice", "outbox")) == ""
    texts = [
        json.loads(line)["text"]
        for line in ok(cli("--id", "bob", "listen", "--count", "3", "--json")).splitlines()
    ]
    assert texts == ["while up", "while down", "are you there?"]


def test_dead_letters_list_retry_and_discard(
    cli: Cli, python_agent: Callable[..., Agent], hub: HubProcess
) -> None:
    ok(cli("--id", "alice", "keygen"))
    ok(cli("--id", "bob", "keygen"))
    bob = python_agent("bob", keypair_path=cli.key("bob"), max_handler_attempts=1)

    @bob.on_message
    def fail(msg: Message) -> None:
        raise RuntimeError(f"cannot handle {msg.text}")

    ok(cli("--id", "alice", "send", "bob", "one"))
    ok(cli("--id", "alice", "send", "bob", "two"))
    wait_until(lambda: len(bob.dead_letters()) == 2, what="two dead letters")
    bob.close()

    rows = [line.split("\t") for line in ok(cli("--id", "bob", "dead-letters")).splitlines()]
    assert [(r[1], r[2], r[5]) for r in rows] == [("in", "alice", "one"), ("in", "alice", "two")]
    assert "RuntimeError: cannot handle one" in rows[0][4]
    ok(cli("--id", "bob", "dead-letters", "retry", rows[0][0]))
    ok(cli("--id", "bob", "dead-letters", "discard", rows[1][0]))
    assert ok(cli("--id", "bob", "dead-letters")) == ""
    again = json.loads(ok(cli("--id", "bob", "listen", "--count", "1", "--json")))
    assert again["text"] == "one" and again["message_id"] == rows[0][0]


def test_a_changed_identity_is_exit_5_until_trust(cli: Cli, tmp_path: Path) -> None:
    ok(cli("--id", "alice", "keygen"))
    ok(cli("--id", "bob", "keygen"))
    ok(cli("--id", "alice", "send", "bob", "hi"))
    # bob starts over with a new key, on a new hub (the old one binds bob to the old key).
    other = HubProcess(tmp_path / "hub2").start()
    try:
        cli.key("bob").unlink()
        blocked = cli("--id", "bob", "keygen")
        assert blocked.returncode == 2 and "former identity" in one_error_line(blocked)
        for old in cli.key("bob").parent.glob("bob.state.sqlite*"):
            old.unlink()
        here = {"AGENTMESH_HUB": f"127.0.0.1:{other.port}"}
        new = ok(cli("--id", "bob", "keygen", **here)).strip()
        ok(cli("--id", "alice", "peers", **here))  # alice registers on the new hub
        ok(cli("--id", "bob", "send", "alice", "it is me, new key", **here))

        # alice's agent sees bob's new key when that message arrives (held back, not
        # delivered); from then on every send to bob stops with exit code 5.
        outcomes: list[Any] = []
        wait_until(
            lambda: (
                outcomes.append(cli("--id", "alice", "send", "bob", "?", **here))
                or outcomes[-1].returncode == 5
            ),
            timeout=60,
            what="alice notices bob's new key",
        )
        line = one_error_line(outcomes[-1])
        assert new in line and f"agentmesh trust bob {new}" in line
        assert all(o.returncode in (0, 5) for o in outcomes)

        ok(cli("--id", "alice", "trust", "bob", new))
        got = json.loads(ok(cli("--id", "alice", "listen", "--count", "1", "--json", **here)))
        assert got["sender"] == "bob" and got["text"] == "it is me, new key"
        ok(cli("--id", "alice", "send", "bob", "welcome back", **here))
        texts = [
            json.loads(line)["text"]
            for line in ok(
                cli("--id", "bob", "listen", "--count", "1", "--json", **here)
            ).splitlines()
        ]
        assert texts == ["welcome back"]
    finally:
        other.stop()


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = self_signed_pem(tmp_path)
    process = HubProcess(tmp_path / "tls-hub", "--tls-cert", str(cert), "--tls-key", str(key))
    process.start()
    try:
        (tmp_path / "home").mkdir()
        cli = Cli(tmp_path / "home", process, {"AGENTMESH_CA": str(cert)})
        ok(cli("--id", "alice", "keygen"))
        ok(cli("--id", "bob", "keygen"))
        ok(cli("--id", "alice", "send", "bob", "over TLS"))
        got = json.loads(ok(cli("--id", "bob", "listen", "--count", "1", "--json")))
        assert got["text"] == "over TLS"
        # --tls alone checks the system's CAs, which do not know this hub: refused.
        untrusted = cli("--id", "alice", "--tls", "peers", AGENTMESH_CA="")
        assert untrusted.returncode == 6 and "hub" in one_error_line(untrusted)
    finally:
        process.stop()


def test_sigterm_ends_listen_like_ctrl_c_and_releases_the_identity(cli: Cli) -> None:
    ok(cli("--id", "bob", "keygen"))
    command = [sys.executable, "-m", "agentmesh.cli", "--id", "bob", "--log-level", "INFO"]
    listening = subprocess.Popen(
        [*command, "listen"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.environment(),
        cwd=cli.home,
    )
    try:
        assert listening.stderr is not None
        for line in listening.stderr:  # INFO logging says when bob is in, waiting
            if "logged in to the hub" in line:
                break
        listening.send_signal(signal.SIGTERM)
        assert listening.wait(30) == 130
        assert "Traceback" not in listening.stderr.read()
    finally:
        if listening.poll() is None:
            listening.kill()
    assert ok(cli("--id", "bob", "status"))  # the identity lock went with the process
