"""A minimal hub client for the load generators: raw frames over an asyncio Protocol.

It logs in with a real Ed25519 identity (HELLO -> LOGIN signed over the
challenge -> LOGGED_IN, using the public codecs of
:mod:`agentmesh.wire.frames` and :mod:`agentmesh.protocol.hub_protocol`),
then writes pre-encoded SEND frames and counts SEND_ACKs, or receives PUSH
frames and answers with batched ACKs. It does no end-to-end crypto and keeps
per-frame work to slicing bytes, so on a 2-core machine as much CPU as
possible is left to the hub being measured.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.protocol.hub_protocol import PROTOCOL_VERSION, login_message, parse_hub_names
from agentmesh.wire import frames as f
from agentmesh.wire.envelope import Envelope, RatchetHeader
from bench.common import now

_HEAD = struct.Struct(">IB")
_SEND_ACK, _ERROR, _PUSH, _PING = 0x21, 0x06, 0x22, 0x07


def dummy_envelope(sender: str, recipient: str, n: int, ciphertext_len: int) -> bytes:
    """A well-formed envelope (random ratchet key and ciphertext): the hub cannot tell."""
    return Envelope(
        message_id=os.urandom(16),
        timestamp=1_700_000_000_000,
        sender=sender,
        recipient=recipient,
        ratchet=RatchetHeader(os.urandom(32), 0, n),
        prekey=None,
        ciphertext=os.urandom(ciphertext_len),
    ).to_bytes()


def send_frame(request_id: int, envelope: bytes) -> bytes:
    return f.encode_frame(f.Send(request_id, envelope))


class RawClient(asyncio.Protocol):
    """One connection. ``await login()``, then ``await push(frames)`` or ``await drain(n)``."""

    def __init__(self, identity: IdentityKeyPair | None, agent_id: str | None) -> None:
        self.identity = identity
        self.agent_id = agent_id
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._frames: asyncio.Queue[tuple[int, bytes]] | None = asyncio.Queue()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        # push state
        self.acked = 0
        self.errors = 0
        self.last_error = ""
        self.on_ack: Callable[[int], None] | None = None
        # drain state
        self.pushed = 0
        self.first_push = 0.0
        self.last_push = 0.0
        self.acking = False
        self.on_push: Callable[[int], None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        acks = 0
        pushed: list[bytes] = []
        while end - pos >= 5:
            length, kind = _HEAD.unpack_from(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            if self._frames is not None:
                self._frames.put_nowait((kind, bytes(buf[pos + 5 : stop])))
            elif kind == _SEND_ACK:
                acks += 1
            elif kind == _PUSH:
                # u64 seq, 16 message id, bytes32 envelope
                pushed.append(bytes(buf[pos + 13 : pos + 29]))
            elif kind == _PING:
                assert self.transport is not None
                self.transport.write(
                    f.encode_frame(f.Pong(int.from_bytes(buf[pos + 5 : stop], "big")))
                )
            elif kind == _ERROR:
                self.errors += 1
                error = f.decode_frame(kind, bytes(buf[pos + 5 : stop]))
                assert isinstance(error, f.Error)
                self.last_error = error.code
                acks += 1  # answered (refused): the window moves on
            pos = stop
        del buf[:pos]
        if acks:
            self.acked += acks
            if self.on_ack is not None:
                self.on_ack(acks)
        if pushed:
            t = now()
            if not self.pushed:
                self.first_push = t
            self.last_push = t
            self.pushed += len(pushed)
            if self.acking and self.transport is not None:
                for start in range(0, len(pushed), 0xFFFF):
                    self.transport.write(
                        f.encode_frame(f.Ack(tuple(pushed[start : start + 0xFFFF])))
                    )
            if self.on_push is not None:
                self.on_push(len(pushed))

    # login

    async def _next(self, timeout: float) -> tuple[int, bytes]:
        assert self._frames is not None
        return await asyncio.wait_for(self._frames.get(), timeout)

    async def hello(self, timeout: float = 60.0) -> f.Hello:
        kind, body = await self._next(timeout)
        hello = f.decode_frame(kind, body)
        if not isinstance(hello, f.Hello):
            raise RuntimeError(f"expected HELLO, got {hello!r}")
        return hello

    async def login(self, timeout: float = 120.0) -> None:
        """HELLO, LOGIN with a signed challenge, LOGGED_IN; then switch to raw counting."""
        assert self.transport is not None and self.identity is not None and self.agent_id
        hello = await self.hello(timeout)
        address = parse_hub_names(hello.hub_address)[0]
        challenge = login_message(hello.nonce, self.agent_id, address)
        self.transport.write(
            f.encode_frame(
                f.Login(
                    1,
                    PROTOCOL_VERSION,
                    self.agent_id,
                    self.identity.public.signing,
                    self.identity.sign(challenge),
                    b"",
                    address,
                )
            )
        )
        kind, body = await self._next(timeout)
        answer = f.decode_frame(kind, body)
        if not isinstance(answer, f.LoggedIn):
            raise RuntimeError(f"login of {self.agent_id} refused: {answer!r}")
        assert self._frames is not None
        leftover = []
        while not self._frames.empty():
            leftover.append(self._frames.get_nowait())
        self._frames = None  # raw mode from now on
        for kind, body in leftover:  # frames that came with LOGGED_IN (pushes)
            self.data_received(_HEAD.pack(len(body) + 1, kind) + body)

    async def stats(self, timeout: float = 30.0) -> dict[str, int]:
        """Anonymous GET_STATS (before login only)."""
        assert self.transport is not None
        await self.hello(timeout)
        self.transport.write(f.encode_frame(f.GetStats(1)))
        kind, body = await self._next(timeout)
        answer = f.decode_frame(kind, body)
        if not isinstance(answer, f.Stats):
            raise RuntimeError(f"expected STATS, got {answer!r}")
        return answer.as_dict()

    # load

    async def push(self, send_frames: list[bytes], window: int) -> float:
        """Write the SEND frames keeping at most ``window`` unanswered; return the last ack time."""
        assert self.transport is not None
        transport = self.transport
        done = self._loop.create_future()
        total = len(send_frames)
        state = {"next": 0}

        def refill(_: int) -> None:
            if self.acked >= total:
                if not done.done():
                    done.set_result(now())
                return
            start = state["next"]
            stop = min(total, self.acked + window)
            if stop > start:
                transport.write(b"".join(send_frames[start:stop]))
                state["next"] = stop

        self.on_ack = refill
        refill(0)
        waiter = asyncio.ensure_future(
            asyncio.wait([done, self.lost], return_when="FIRST_COMPLETED")
        )
        await waiter
        if not done.done():
            raise RuntimeError(f"{self.agent_id}: connection lost after {self.acked} acks")
        result: float = done.result()
        return result

    async def drain(self, expected: int, timeout: float) -> None:
        """Receive (and ACK) pushes until ``expected`` arrived."""
        if self.pushed >= expected:
            return
        done = self._loop.create_future()

        def check(_: int) -> None:
            if self.pushed >= expected and not done.done():
                done.set_result(None)

        self.on_push = check
        await asyncio.wait_for(done, timeout)


async def connect(
    port: int, identity: IdentityKeyPair | None = None, agent_id: str | None = None
) -> RawClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: RawClient(identity, agent_id), "127.0.0.1", port
    )
    return client


async def hub_stats(port: int) -> dict[str, int]:
    client = await connect(port)
    try:
        return await client.stats()
    finally:
        assert client.transport is not None
        client.transport.close()
