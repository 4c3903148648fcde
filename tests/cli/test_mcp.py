"""``agentmesh mcp`` driven by the MCP SDK's own stdio client, against a real hub
subprocess and Python agents: the tools, request/reply, the inbox, tool errors, and
a ``kill -9`` of the server with nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clikit import Cli
from hubproc import ROOT, HubProcess, free_port, wait_until
from mcp import Client, ClientSession, StdioServerParameters, stdio_client

from agentmesh import Agent, IdentityChangedError, Message
from agentmesh.cli.mcp_server import explain
from agentmesh.hub.client import NetworkHub

TOOLS = {
    "send_message": (["to", "text"], {"data": None}),
    "check_inbox": ([], {"max_messages": 10, "wait_seconds": 0}),
    "reply": (["message_id", "text"], {"data": None}),
    "request": (["to", "text"], {"timeout_seconds": 60, "data": None}),
    "list_peers": ([], {}),
    "whoami": ([], {}),
    "safety_number": (["peer"], {}),
}
MESSAGE_FIELDS = {"sender", "text", "type", "payload", "timestamp", "message_id", "in_reply_to"}


@pytest.fixture
def python_agent(
    hub: HubProcess, agents: Callable[..., Agent], tmp_path: Path
) -> Iterator[Callable[[str], Agent]]:
    clients: list[NetworkHub] = []

    def make(agent_id: str) -> Agent:
        client = hub.client()
        clients.append(client)
        return agents(agent_id, client, keypair_path=tmp_path / "py" / f"{agent_id}.json")

    yield make
    for client in clients:
        client.close()


@contextlib.asynccontextmanager
async def mcp_server(cli: Cli, agent_id: str) -> AsyncIterator[tuple[ClientSession, int]]:
    """``agentmesh mcp`` for ``agent_id`` over stdio, and its process id (a shell that
    writes its pid, then execs the server, so the test can ``kill -9`` the server)."""
    pidfile = cli.home / f"mcp-{agent_id}.pid"
    pidfile.unlink(missing_ok=True)
    command = [sys.executable, "-m", "agentmesh.cli", "mcp"]
    params = StdioServerParameters(
        command="/bin/sh",
        args=["-c", 'echo $$ > "$0"; exec "$@"', str(pidfile), *command],
        env=cli.environment(AGENTMESH_ID=agent_id, AGENTMESH_LOG_LEVEL="INFO"),
        cwd=str(cli.home),
    )
    with (cli.home / "mcp-stderr.log").open("a") as errlog:
        async with stdio_client(params, errlog=errlog) as streams:
            async with ClientSession(*streams) as session:
                await session.initialize()
                yield session, int(pidfile.read_text())


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    """A tool's result, parsed from its JSON text (a plain string stays a string)."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    [block] = result.content
    text = block.text  # type: ignore[union-attr]
    try:
        return json.loads(text)
    except ValueError:
        return text


async def error_of(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.content
    return str(result.content[0].text)  # type: ignore[union-attr]


def keygen(cli: Cli, agent_id: str) -> str:
    made = cli("--id", agent_id, "keygen")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_the_tools_their_parameters_and_whoami(cli: Cli) -> None:
    fingerprint = keygen(cli, "llm")

    async def scenario() -> None:
        async with mcp_server(cli, "llm") as (session, _):
            listed = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(listed) == set(TOOLS)
            for name, (required, defaults) in TOOLS.items():
                schema = listed[name].input_schema
                assert sorted(schema.get("required", [])) == sorted(required), name
                assert set(schema["properties"]) == {*required, *defaults}, name
                for parameter, default in defaults.items():
                    assert schema["properties"][parameter]["default"] == default
                assert len(listed[name].description or "") > 80, name  # written for an LLM
            me = await call(session, "whoami")
            hub = cli.environment()["AGENTMESH_HUB"]
            assert me == {"id": "llm", "fingerprint": fingerprint, "hub": hub}

    asyncio.run(scenario())


def test_request_to_a_python_agent_that_replies(
    cli: Cli, python_agent: Callable[[str], Agent]
) -> None:
    keygen(cli, "llm")
    worker = python_agent("worker")

    @worker.on_message
    def answer(msg: Message) -> None:
        msg.reply(f"done: {msg.text}", doc=msg.payload.get("doc"))

    async def scenario() -> None:
        async with mcp_server(cli, "llm") as (session, _):
            assert await call(session, "list_peers") == ["worker"]
            reply = await call(session, "request", to="worker", text="summarise", data={"doc": 42})
            assert set(reply) == MESSAGE_FIELDS
            assert reply["sender"] == "worker" and reply["text"] == "done: summarise"
            assert reply["payload"]["doc"] == 42 and reply["in_reply_to"]
            number = await call(session, "safety_number", peer="worker")
            assert number == worker.safety_number("llm")

    asyncio.run(scenario())


def test_send_message_then_check_inbox_with_a_wait_then_reply(
    cli: Cli, hub: HubProcess, python_agent: Callable[[str], Agent]
) -> None:
    keygen(cli, "llm")
    py = python_agent("py")  # no handler: it pulls with next_message

    async def scenario() -> None:
        async with mcp_server(cli, "llm") as (session, _):
            assert await call(session, "check_inbox") == []
            sent = await call(session, "send_message", to="py", text="hello", data={"n": 1})
            got = await asyncio.to_thread(py.next_message, 30)
            assert (got.sender, got.text, got.payload["n"], got.message_id) == (
                "llm",
                "hello",
                1,
                sent,
            )
            # check_inbox waits for the answer, which py sends once the call is under way.
            waiting = asyncio.create_task(call(session, "check_inbox", wait_seconds=60))
            await asyncio.sleep(0)  # the call is sent
            # A waiting tool does not block the server: another call is answered meanwhile
            # (the answer py sends comes only after it).
            assert (await call(session, "whoami"))["id"] == "llm"
            await asyncio.to_thread(py.reply, got, "hi back")
            [answer] = await waiting
            assert set(answer) == MESSAGE_FIELDS
            assert (answer["sender"], answer["text"], answer["in_reply_to"]) == (
                "py",
                "hi back",
                sent,
            )
            reply_id = await call(session, "reply", message_id=answer["message_id"], text="thanks")
            thanks = await asyncio.to_thread(py.next_message, 30)
            assert (thanks.text, thanks.in_reply_to, thanks.message_id) == (
                "thanks",
                answer["message_id"],
                reply_id,
            )
            # Several waiting: at most max_messages per call, oldest first, each once.
            for n in range(3):
                await asyncio.to_thread(py.send, "llm", f"m{n}")
            wait_until(lambda: hub.queued_for("llm") == 0, what="llm took m0..m2")
            first = await call(session, "check_inbox", max_messages=2)
            rest = await call(session, "check_inbox", max_messages=2)
            assert [m["text"] for m in first + rest] == ["m0", "m1", "m2"]
            assert await call(session, "check_inbox") == []

    asyncio.run(scenario())


def test_errors_are_tool_errors_and_the_server_stays_up(
    cli: Cli, python_agent: Callable[[str], Agent]
) -> None:
    keygen(cli, "llm")
    python_agent("silent")  # never answers

    async def scenario() -> None:
        async with mcp_server(cli, "llm") as (session, _):
            text = await error_of(session, "send_message", to="nobody", text="hi")
            assert "'nobody'" in text and "list_peers" in text
            text = await error_of(session, "request", to="silent", text="?", timeout_seconds=0.5)
            assert "no reply from 'silent'" in text and "check_inbox" in text
            text = await error_of(session, "reply", message_id="ab" * 16, text="x")
            assert "Unknown message_id" in text and "send_message" in text
            text = await error_of(session, "safety_number", peer="stranger")
            assert "exchange a message" in text
            text = await error_of(session, "send_message", to="bad id!", text="x")
            assert "invalid agent id" in text
            assert "'text'" in await error_of(
                session, "send_message", to="silent", text="x", data={"text": "y"}
            )
            assert "max_messages" in await error_of(session, "check_inbox", max_messages=0)
            assert (await call(session, "whoami"))["id"] == "llm"  # still serving

    asyncio.run(scenario())


def test_an_identity_change_is_explained_for_a_human_to_verify() -> None:
    text = explain(IdentityChangedError("bob", "aaaa:1111", "bbbb:2222"), "llm")
    assert "aaaa:1111" in text and "bbbb:2222" in text
    assert "agentmesh --id bob whoami" in text and "agentmesh --id llm trust bob bbbb:2222" in text
    assert "Do not retry" in text


def test_kill_9_and_restart_of_the_server_lose_nothing(
    cli: Cli, hub: HubProcess, python_agent: Callable[[str], Agent]
) -> None:
    keygen(cli, "llm")
    py = python_agent("py")

    async def first_run() -> None:
        async with mcp_server(cli, "llm") as (session, pid):
            assert await call(session, "check_inbox") == []
            py.send("llm", "arrived before check_inbox")
            # In the server's durable inbox (the hub drops it only once llm committed it).
            wait_until(lambda: hub.queued_for("llm") == 0, what="llm took the message")
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.waitpid(pid, 0)

    with contextlib.suppress(Exception):  # the client sees its server die
        asyncio.run(first_run())
    py.send("llm", "arrived while the server was down")
    assert hub.queued_for("llm") == 1

    async def second_run() -> list[str]:
        texts: list[str] = []
        async with mcp_server(cli, "llm") as (session, _):
            while len(texts) < 2:
                texts += [m["text"] for m in await call(session, "check_inbox", wait_seconds=30)]
            assert await call(session, "check_inbox") == []
        return texts

    assert asyncio.run(second_run()) == [
        "arrived before check_inbox",
        "arrived while the server was down",
    ]


def test_the_readme_snippet_works_as_written(cli: Cli) -> None:
    """The README's MCP configuration, run as an MCP client runs it (only the hub's
    port differs): the installed ``agentmesh`` command, ``args``, ``env``."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", readme, re.S)
    [config] = [json.loads(b) for b in blocks if '"mcpServers"' in b]
    server = config["mcpServers"]["agentmesh"]
    assert server["command"] == "agentmesh" and server["args"] == ["mcp"]
    # The console script of the environment running the tests (pip install -e .).
    command = shutil.which(server["command"], path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("agentmesh is not installed as a command here (pip install -e '.[dev]')")
    env = dict(server["env"])
    env["AGENTMESH_HUB"] = cli.environment()["AGENTMESH_HUB"]
    keygen(cli, env["AGENTMESH_ID"])

    async def scenario() -> None:
        params = StdioServerParameters(
            command=command,
            args=server["args"],
            env={**env, "HOME": str(cli.home)},
            cwd=str(cli.home),
        )
        async with stdio_client(params) as streams, ClientSession(*streams) as session:
            await session.initialize()
            assert (await call(session, "whoami"))["id"] == env["AGENTMESH_ID"]

    asyncio.run(scenario())


def test_streamable_http_serves_the_same_tools(cli: Cli) -> None:
    keygen(cli, "daemon")
    port = free_port()
    errlog = cli.home / "http-stderr.log"
    command = [sys.executable, "-m", "agentmesh.cli", "--id", "daemon", "mcp"]
    with errlog.open("w") as stderr:
        server = subprocess.Popen(
            [*command, "--http", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=cli.environment(),
            cwd=cli.home,
        )

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return server.poll() is not None  # stop waiting if it died (asserted below)

    try:
        wait_until(listening, timeout=60, what="the MCP HTTP server listens")
        assert server.poll() is None, errlog.read_text()

        async def scenario() -> None:
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                assert {t.name for t in (await client.list_tools()).tools} == set(TOOLS)
                me = (await client.call_tool("whoami", {})).content[0]
                assert json.loads(me.text)["id"] == "daemon"  # type: ignore[union-attr]
                inbox = (await client.call_tool("check_inbox", {})).content[0]
                assert inbox.text == "[]"  # type: ignore[union-attr]

        asyncio.run(scenario())
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise


def test_the_readme_walkthrough_two_llm_agents_and_a_python_agent(
    cli: Cli, python_agent: Callable[[str], Agent]
) -> None:
    """The README's walkthrough, with the tool calls its two models make."""
    keygen(cli, "planner")
    keygen(cli, "coder")
    search = python_agent("search")

    @search.on_message
    def answer(msg: Message) -> None:
        msg.reply(f"3 results for {msg.text!r}", urls=["https://example.org/a"])

    async def scenario() -> None:
        async with mcp_server(cli, "planner") as (planner, _):
            found = await call(planner, "request", to="search", text="rate limiting prior art")
            assert found["text"] == "3 results for 'rate limiting prior art'"
            urls = found["payload"]["urls"]
            task = await call(
                planner,
                "send_message",
                to="coder",
                text="Implement a token bucket; see the urls",
                data={"urls": urls},
            )
            # The coder's client starts only now: the hub kept the message meanwhile.
            async with mcp_server(cli, "coder") as (coder, _):
                [job] = await call(coder, "check_inbox", wait_seconds=30)
                assert (job["sender"], job["message_id"], job["payload"]["urls"]) == (
                    "planner",
                    task,
                    urls,
                )
                await call(coder, "reply", message_id=task, text="Done: ratelimit.py, 12 tests")
            [done] = await call(planner, "check_inbox", wait_seconds=30)
            assert (done["sender"], done["text"], done["in_reply_to"]) == (
                "coder",
                "Done: ratelimit.py, 12 tests",
                task,
            )

    asyncio.run(scenario())
