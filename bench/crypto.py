"""Crypto benchmarks: message throughput next to the raw primitive costs it is made of.

    PYTHONPATH=. python -m bench.crypto [--duration 0.5] [--json PATH]

Measures, in one process and one run, so the figures are comparable:

* seal + unseal of a 200-byte payload: ``Session.encrypt`` + envelope encoding
  ("seal"), then envelope parsing + ``Session.decrypt`` or
  ``SessionRecord.decrypt`` ("unseal"), committing the new state each time,
  with and without per-message signatures;
* the primitives underneath: Ed25519 sign/verify, X25519, ML-KEM-768
  encapsulation/decapsulation, AES-256-GCM on 200 bytes, HKDF-SHA256,
  HMAC-SHA256;
* the PQXDH handshake: ``Session.initiate`` (bundle verification, four X25519,
  one encapsulation) and the responder's first ``SessionRecord.decrypt``.

It also adds up the primitive costs one message needs (the "floor") so the
overhead of the Python layers is visible. Timings are printed, never
asserted: they depend on the machine. ``run(duration_s)`` is importable (for
``bench/run.py``); ``duration_s`` is the time spent on *each* measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentmesh.crypto import primitives as p
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import PrekeyBundle, PrekeySecrets
from agentmesh.crypto.session import Session, SessionRecord, message_key_material
from agentmesh.wire.envelope import decode_envelope

PAYLOAD_SIZE = 200
DEFAULT_DURATION_S = 0.5
_NOW_MS = 1_700_000_000_000


@dataclass(frozen=True, slots=True)
class Measurement:
    ops: int
    seconds: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6 if self.ops else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "ops": self.ops,
            "seconds": round(self.seconds, 6),
            "ops_per_s": round(self.ops_per_s, 1),
            "us_per_op": round(self.us_per_op, 3),
        }


def measure(fn: Callable[[], object], duration_s: float) -> Measurement:
    """Call ``fn`` repeatedly for about ``duration_s`` seconds, in calibrated batches."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    single = max(time.perf_counter() - start, 1e-7)
    batch = max(1, min(10_000, int(0.002 / single)))  # ~2 ms per batch
    ops = 0
    start = time.perf_counter()
    deadline = start + duration_s
    while True:
        for _ in range(batch):
            fn()
        ops += batch
        now = time.perf_counter()
        if now >= deadline:
            return Measurement(ops, now - start)


# --- fixtures ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Parties:
    alice: IdentityKeyPair
    bob: IdentityKeyPair
    prekeys: PrekeySecrets
    bundle: PrekeyBundle


def _parties() -> _Parties:
    alice, bob = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    prekeys = PrekeySecrets.create(bob, _NOW_MS)
    prekeys.top_up(bob, _NOW_MS, pool_size=1)
    bundle = prekeys.bundle("bob", bob.public).with_one_time(
        next(iter(prekeys.one_time.values())).public,
        next(iter(prekeys.one_time_kem.values())).public,
    )
    return _Parties(alice, bob, prekeys, bundle)


class _Stream:
    """Alice sends to Bob on an established session; each call seals and unseals one message."""

    def __init__(self, parties: _Parties, *, sign: bool, via_record: bool) -> None:
        self.p = parties
        self.counter = 0
        self.via_record = via_record
        self.payload = os.urandom(PAYLOAD_SIZE)
        self.alice = Session.initiate(parties.alice, "alice", parties.bundle, sign_messages=sign)
        record, _, _ = SessionRecord().decrypt(
            decode_envelope(self._seal()),
            identity=parties.bob,
            prekeys=parties.prekeys,
            require_signatures=sign,
        )
        bob = record.active
        assert bob is not None
        reply = bob.encrypt(parties.bob, b"ack", message_id=os.urandom(16), timestamp_ms=_NOW_MS)
        self.alice, _ = self.alice.decrypt(decode_envelope(reply.to_bytes()))
        self.record = record
        self.bob = bob
        self.seal_s = 0.0
        self.unseal_s = 0.0

    def _seal(self) -> bytes:
        self.counter += 1
        return self.alice.encrypt(
            self.p.alice,
            self.payload,
            message_id=self.counter.to_bytes(16, "big"),
            timestamp_ms=_NOW_MS,
        ).to_bytes()

    def __call__(self) -> None:
        t0 = time.perf_counter()
        wire = self._seal()
        t1 = time.perf_counter()
        envelope = decode_envelope(wire)
        if self.via_record:
            self.record, _, message = self.record.decrypt(
                envelope, identity=self.p.bob, prekeys=self.p.prekeys
            )
        else:
            self.bob, message = self.bob.decrypt(envelope)
        t2 = time.perf_counter()
        self.seal_s += t1 - t0
        self.unseal_s += t2 - t1
        if len(message.payload) != PAYLOAD_SIZE:
            raise RuntimeError("benchmark payload mismatch")


# --- benchmarks -----------------------------------------------------------------------------


def _primitives(duration_s: float) -> dict[str, Measurement]:
    ed = Ed25519PrivateKey.generate()
    ed_pub = ed.public_key()
    msg = os.urandom(PAYLOAD_SIZE)
    sig = ed.sign(msg)
    x_a, x_b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    x_b_raw = p.x25519_public_bytes(x_b)
    x_b_pub = x_b.public_key()
    kem = MLKEM768PrivateKey.generate()
    kem_pub_raw = p.mlkem_public_bytes(kem)
    kem_pub = kem.public_key()
    _, kem_ct = kem_pub.encapsulate()
    key, nonce = os.urandom(32), os.urandom(12)
    ad = os.urandom(64)
    ct = p.aes_gcm_encrypt(key, nonce, msg, ad)
    ikm, salt = os.urandom(32), os.urandom(32)
    return {
        "Ed25519 sign (200 B)": measure(lambda: ed.sign(msg), duration_s),
        "Ed25519 verify (200 B)": measure(lambda: ed_pub.verify(sig, msg), duration_s),
        "X25519 exchange (raw)": measure(lambda: x_a.exchange(x_b_pub), duration_s),
        "X25519 exchange (validated)": measure(lambda: p.x25519(x_a, x_b_raw), duration_s),
        "X25519 keygen": measure(X25519PrivateKey.generate, duration_s),
        "ML-KEM-768 encaps": measure(kem_pub.encapsulate, duration_s),
        "ML-KEM-768 encaps (from bytes)": measure(
            lambda: p.mlkem_encapsulate(kem_pub_raw), duration_s
        ),
        "ML-KEM-768 decaps": measure(lambda: kem.decapsulate(kem_ct), duration_s),
        "ML-KEM-768 keygen": measure(MLKEM768PrivateKey.generate, duration_s),
        "AES-256-GCM encrypt (200 B)": measure(
            lambda: p.aes_gcm_encrypt(key, nonce, msg, ad), duration_s
        ),
        "AES-256-GCM decrypt (200 B)": measure(
            lambda: p.aes_gcm_decrypt(key, nonce, ct, ad), duration_s
        ),
        "HKDF-SHA256 (44 B out)": measure(
            lambda: p.hkdf_sha256(ikm, salt=None, info=b"bench", length=44), duration_s
        ),
        "HKDF-SHA256 (64 B out, salted)": measure(
            lambda: p.hkdf_sha256(ikm, salt=salt, info=b"bench", length=64), duration_s
        ),
        "HMAC-SHA256 (1 B)": measure(lambda: p.hmac_sha256(key, b"\x01"), duration_s),
        "message key -> AES key+nonce": measure(
            lambda: message_key_material(key, bytes(16)), duration_s
        ),
    }


def _handshake(duration_s: float) -> dict[str, Measurement]:
    parties = _parties()
    first = Session.initiate(parties.alice, "alice", parties.bundle)
    wire = first.encrypt(
        parties.alice, b"x" * PAYLOAD_SIZE, message_id=bytes(16), timestamp_ms=_NOW_MS
    ).to_bytes()
    envelope = decode_envelope(wire)

    def respond() -> None:
        SessionRecord().decrypt(envelope, identity=parties.bob, prekeys=parties.prekeys)

    return {
        "bundle verify (4 signatures)": measure(parties.bundle.verify, duration_s),
        "PQXDH initiate (Session.initiate)": measure(
            lambda: Session.initiate(parties.alice, "alice", parties.bundle), duration_s
        ),
        "PQXDH respond + first decrypt": measure(respond, duration_s),
    }


def _messages(duration_s: float) -> tuple[dict[str, Measurement], dict[str, dict[str, float]]]:
    parties = _parties()
    results: dict[str, Measurement] = {}
    split: dict[str, dict[str, float]] = {}
    for sign in (True, False):
        for via_record in (False, True):
            name = (
                f"seal+unseal {PAYLOAD_SIZE} B, "
                f"{'SessionRecord' if via_record else 'Session'}.decrypt, "
                f"{'signed' if sign else 'unsigned'}"
            )
            stream = _Stream(parties, sign=sign, via_record=via_record)
            stream.seal_s = stream.unseal_s = 0.0
            m = measure(stream, duration_s)
            results[name] = m
            calls = m.ops + 2  # measure() makes two warm-up calls
            split[name] = {
                "seal_us": round(stream.seal_s / calls * 1e6, 3),
                "unseal_us": round(stream.unseal_s / calls * 1e6, 3),
            }
    return results, split


def _floor(prims: dict[str, Measurement], signed: bool) -> float:
    """Primitive cost (µs) one message needs on both sides together."""
    us = {k: v.us_per_op for k, v in prims.items()}
    total = 2 * us["HMAC-SHA256 (1 B)"] * 2  # KDF_CK on each side: two HMACs
    total += 2 * us["HKDF-SHA256 (44 B out)"]  # message key -> key || nonce, each side
    total += us["AES-256-GCM encrypt (200 B)"] + us["AES-256-GCM decrypt (200 B)"]
    if signed:
        total += us["Ed25519 sign (200 B)"] + us["Ed25519 verify (200 B)"]
    return total


def run(duration_s: float = DEFAULT_DURATION_S) -> dict[str, Any]:
    """Run every measurement for ``duration_s`` seconds each; return a JSON-safe dict."""
    started = time.time()
    prims = _primitives(duration_s)
    handshake = _handshake(duration_s)
    messages, split = _messages(duration_s)
    floors = {"signed": _floor(prims, True), "unsigned": _floor(prims, False)}
    analysis: dict[str, dict[str, float]] = {}
    for name, m in messages.items():
        floor = floors["signed" if ", signed" in name else "unsigned"]
        analysis[name] = {
            **split[name],
            "primitive_floor_us": round(floor, 3),
            "python_overhead_x": round(m.us_per_op / floor, 2) if floor else 0.0,
        }
    return {
        "benchmark": "crypto",
        "payload_bytes": PAYLOAD_SIZE,
        "duration_s_per_measurement": duration_s,
        "wall_s": round(time.time() - started, 3),
        "environment": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "cryptography": cryptography.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count() or 0,
        },
        "messages": {k: v.as_dict() for k, v in messages.items()},
        "message_analysis": analysis,
        "handshake": {k: v.as_dict() for k, v in handshake.items()},
        "primitives": {k: v.as_dict() for k, v in prims.items()},
    }


def format_table(result: dict[str, Any]) -> str:
    lines: list[str] = []
    width = 58

    def section(title: str, rows: dict[str, dict[str, float]]) -> None:
        lines.append("")
        lines.append(f"{title:<{width}} {'ops/s':>12} {'us/op':>10}")
        lines.append("-" * (width + 24))
        for name, row in rows.items():
            lines.append(f"{name:<{width}} {row['ops_per_s']:>12,.0f} {row['us_per_op']:>10.2f}")

    env = result["environment"]
    lines.append(
        f"AgentMesh crypto bench: Python {env['python']}, cryptography {env['cryptography']}, "
        f"{env['machine']}, {env['cpus']} CPUs, {result['duration_s_per_measurement']} s each"
    )
    section("Messages (one process, both sides)", result["messages"])
    lines.append("")
    lines.append(
        f"{'  split and overhead':<{width}} {'seal us':>9} {'unseal us':>10} "
        f"{'floor us':>9} {'x floor':>8}"
    )
    for name, row in result["message_analysis"].items():
        lines.append(
            f"  {name:<{width - 2}} {row['seal_us']:>9.2f} {row['unseal_us']:>10.2f} "
            f"{row['primitive_floor_us']:>9.2f} {row['python_overhead_x']:>8.2f}"
        )
    section("PQXDH handshake", result["handshake"])
    section("Primitives", result["primitives"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        help="seconds per measurement (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.duration)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
