"""Deterministic randomness and hypothesis settings shared by the crypto tests.

(``tests/crypto/test_protocol_vectors.py`` keeps its own copy of the stream on
purpose: there the stream's definition is part of the recorded vectors.)
"""

from __future__ import annotations

import hashlib

from hypothesis import settings

#: Property tests: reproducible examples, no example database on disk.
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None)


class Rng:
    """Counter-mode SHA-256 byte stream: ``rng(n)`` returns the next ``n`` bytes."""

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self._label + self._counter.to_bytes(4, "big")).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out
