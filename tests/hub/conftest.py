"""Fixtures for the network-hub tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hubproc import HubProcess


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub subprocess of this test's own, killed after it."""
    hub = HubProcess(tmp_path).start()
    yield hub
    hub.stop()
