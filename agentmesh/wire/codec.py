"""A tiny strict binary codec shared by envelopes, frames and stored state.

Big-endian fixed-width integers and length-prefixed byte strings. The reader
never returns a short read: every overrun raises :class:`DecodeError`, and
:meth:`Reader.finish` rejects trailing bytes, so a parser built on it is strict
by construction. No I/O, no other package imports.
"""

from __future__ import annotations

import struct

from agentmesh.errors import DecodeError

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Writer:
    """Accumulates fields into one ``bytes`` value."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(_U8.pack(value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def raw(self, data: bytes) -> Writer:
        self._parts.append(bytes(data))
        return self

    def bytes8(self, data: bytes) -> Writer:
        """Write ``data`` behind a one-byte length (at most 255 bytes)."""
        if len(data) > 0xFF:
            raise ValueError("field longer than 255 bytes")
        self._parts.append(_U8.pack(len(data)))
        self._parts.append(bytes(data))
        return self

    def bytes16(self, data: bytes) -> Writer:
        if len(data) > 0xFFFF:
            raise ValueError("field longer than 65535 bytes")
        self._parts.append(_U16.pack(len(data)))
        self._parts.append(bytes(data))
        return self

    def bytes32(self, data: bytes) -> Writer:
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(bytes(data))
        return self

    def str8(self, text: str) -> Writer:
        return self.bytes8(text.encode("utf-8"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads fields from ``data``; every overrun or leftover raises DecodeError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str = "data") -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def position(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise DecodeError(f"{self._what}: truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return int(_U8.unpack(self._take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def bytes8(self, max_len: int = 0xFF) -> bytes:
        n = self.u8()
        if n > max_len:
            raise DecodeError(f"{self._what}: field of {n} bytes exceeds {max_len}")
        return self._take(n)

    def bytes16(self, max_len: int = 0xFFFF) -> bytes:
        n = self.u16()
        if n > max_len:
            raise DecodeError(f"{self._what}: field of {n} bytes exceeds {max_len}")
        return self._take(n)

    def bytes32(self, max_len: int) -> bytes:
        n = self.u32()
        if n > max_len:
            raise DecodeError(f"{self._what}: field of {n} bytes exceeds {max_len}")
        return self._take(n)

    def str8(self, max_len: int = 0xFF) -> str:
        raw = self.bytes8(max_len)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{self._what}: invalid UTF-8") from exc

    def rest(self) -> bytes:
        return self._take(self.remaining())

    def finish(self) -> None:
        """Raise DecodeError if any byte is left unread."""
        if self._pos != len(self._data):
            raise DecodeError(f"{self._what}: {len(self._data) - self._pos} trailing bytes")
