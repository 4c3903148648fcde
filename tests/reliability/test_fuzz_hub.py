"""A live hub under fuzzing (CI size): see ``fuzz_hub.py`` for the scenarios.

The full run (100,000 frames and more) is the script itself::

    python tests/reliability/fuzz_hub.py --frames 100000 --seed 1

``AGENTMESH_SOAK=1`` runs 100,000 frames here too.
"""

from __future__ import annotations

import os

import pytest
from fuzz_hub import run_fuzz

SOAK = os.environ.get("AGENTMESH_SOAK") == "1"
FRAMES = 100_000 if SOAK else 8_000
SEED = 20261124


@pytest.mark.timeout(1800 if SOAK else 300)
def test_live_hub_survives_fuzzing_and_legitimate_agents_lose_nothing() -> None:
    report = run_fuzz(FRAMES, SEED, workers=16)
    print("\n" + report.summary())
    assert report.problems == [], "\n".join(report.problems)
    assert report.frames >= FRAMES
    assert report.hub_alive and report.hub_tracebacks == 0
    assert report.legit_sent > 0
    assert report.legit_lost == report.legit_duplicates == report.legit_out_of_order == 0
    assert set(report.by_kind) == {
        "random", "mutated", "field", "truncated", "oversized", "anonymous",
        "login_garbage", "login_hostile",
    }  # fmt: skip
