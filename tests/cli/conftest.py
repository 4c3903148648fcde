"""Fixtures for the command-line and MCP tests: a hub subprocess of the test's own,
and a :class:`clikit.Cli` pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clikit import Cli
from hubproc import HubProcess


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub", graceful_stop=True).start()
    yield process
    process.stop()


@pytest.fixture
def cli(tmp_path: Path, hub: HubProcess) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home, hub)
