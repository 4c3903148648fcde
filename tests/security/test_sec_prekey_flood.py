"""A flood of ``PREKEYS_LOW(0)`` reports (from a hostile or broken hub).

Each report used to make a whole new pool of one-time prekeys (an ML-KEM key
generation and a signature per key) and, past ``ONE_TIME_KEEP_FACTOR`` pools,
erase the oldest keys, including ones just handed out to senders whose initial
messages were on their way. ``PrekeySecrets.replenish`` now runs at most once per
``REPLENISH_MIN_INTERVAL_MS``; a report held back is carried out by ``rotate``
once the interval is over.
"""

from __future__ import annotations

import pytest
from agentkit import Inbox
from deterministic import Rng
from security_helpers import InterceptHub

from agentmesh import Agent
from agentmesh.crypto.identity import IdentityKeyPair
from agentmesh.crypto.prekeys import (
    ONE_TIME_KEEP_FACTOR,
    REPLENISH_MIN_INTERVAL_MS,
    PrekeyBundle,
    PrekeySecrets,
)
from agentmesh.wire.envelope import decode_envelope

pytestmark = pytest.mark.timeout(120)

NOW = 1_700_000_000_000
POOL = 4
RNG = Rng("prekey-flood")
BOB = IdentityKeyPair.generate(RNG)


def _secrets() -> PrekeySecrets:
    secrets = PrekeySecrets.create(BOB, NOW, RNG)
    secrets.top_up(BOB, NOW, RNG, pool_size=POOL)
    return secrets


def test_flood_of_prekeys_low_reports_makes_one_pool__replenish_rate_limit() -> None:
    """1,000 reports at the same clock: one pool of each kind is made, every key
    from before the flood is still there, and the held-back demand is met once."""
    secrets = _secrets()
    outstanding = (set(secrets.one_time), set(secrets.one_time_kem))
    made = [secrets.replenish(BOB, NOW, RNG, remaining=0, pool_size=POOL) for _ in range(1000)]
    assert made[0] == 2 * POOL and sum(made) == 2 * POOL
    assert len(secrets.one_time) == len(secrets.one_time_kem) == 2 * POOL
    assert outstanding[0] <= set(secrets.one_time)
    assert outstanding[1] <= set(secrets.one_time_kem)
    assert len(secrets.unpublished) == 4 * POOL  # top_up's and the one replenishment

    # the rate limit survives a restart, and the held-back report is carried out later
    secrets = PrekeySecrets.from_bytes(secrets.to_bytes())
    assert secrets.replenish(BOB, NOW + 1, RNG, remaining=0, pool_size=POOL) == 0
    assert not secrets.rotate(BOB, NOW + REPLENISH_MIN_INTERVAL_MS - 1, RNG)
    assert secrets.rotate(BOB, NOW + REPLENISH_MIN_INTERVAL_MS, RNG)
    assert len(secrets.one_time) == len(secrets.one_time_kem) == 3 * POOL
    assert secrets.deferred_replenish is None
    assert not secrets.rotate(BOB, NOW + 2 * REPLENISH_MIN_INTERVAL_MS, RNG)


def test_sustained_flood_is_bounded_and_keeps_keys_for_an_hour__replenish_rate_limit() -> None:
    """Reports every minute for 6 hours (each tried 10 times, the schedule run after
    each minute): at most one pool per interval, and no one-time key is erased
    less than (ONE_TIME_KEEP_FACTOR - 1) intervals (1 h) after it was made."""
    secrets = _secrets()
    made_at = {i: NOW for i in [*secrets.one_time, *secrets.one_time_kem]}
    minute = 60_000
    total = 0
    hours = 6
    for step in range(1, hours * 60 + 1):
        now = NOW + step * minute
        for _ in range(10):
            total += secrets.replenish(BOB, now, RNG, remaining=0, pool_size=POOL)
        secrets.rotate(BOB, now, RNG, rotation_ms=10**15)
        held = {*secrets.one_time, *secrets.one_time_kem}
        for prekey_id in held - made_at.keys():
            made_at[prekey_id] = now
        for prekey_id in [i for i in made_at if i not in held]:
            assert now - made_at.pop(prekey_id) >= (ONE_TIME_KEEP_FACTOR - 1) * (
                REPLENISH_MIN_INTERVAL_MS
            )
    intervals = hours * 3_600_000 // REPLENISH_MIN_INTERVAL_MS
    made = len(secrets.unpublished) - 2 * POOL  # every key made since top_up
    assert made <= (1 + intervals) * 2 * POOL
    assert total <= made
    assert len(secrets.one_time) <= ONE_TIME_KEEP_FACTOR * POOL


def test_agent_survives_a_prekeys_low_flood__replenish_rate_limit() -> None:
    """Through an Agent on LocalHub: a one-time prekey handed out before 1,000
    ``prekeys_low(0)`` calls still opens a session afterwards, and the flood made
    at most one pool of each kind."""
    hub = InterceptHub()
    bob = Agent("bob", hub=hub, prekey_pool_size=POOL)
    carol = Agent("carol", hub=hub)
    try:
        inbox = Inbox()
        bob.on_message(inbox)
        bundle = hub.get_bundle("bob")  # hands out a one-time prekey (and reports low)
        opk = PrekeyBundle.from_dict(bundle).one_time_prekey
        assert opk is not None
        before = bob.status()["one_time_prekeys"]
        for _ in range(1000):
            bob.endpoint.prekeys_low(0)
        assert bob.status()["one_time_prekeys"] <= before + POOL

        carol.connect_with_bundle(bundle)
        carol.send("bob", "after the flood")
        initial = decode_envelope(hub.envelopes[-1]).prekey
        assert initial is not None and initial.one_time_prekey_id == opk.prekey_id
        assert inbox.texts == ["after the flood"]
    finally:
        carol.close()
        bob.close()
