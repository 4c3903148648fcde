"""Every script under examples/ runs to completion (exit 0) as users run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
TIMEOUT_S = 120  # a hang guard, not a performance assertion
FINGERPRINT_RE = re.compile(r"\b[0-9a-f]{4}(?::[0-9a-f]{4}){7}\b")
# Examples must run offline, without any model provider credentials.
_PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROVIDER_KEYS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_example(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            [sys.executable, str(path)],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{path.name} did not finish within {TIMEOUT_S}s\n{exc.stdout}\n{exc.stderr}")
    assert result.returncode == 0, (
        f"{path.name} exited {result.returncode}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}"
    )
    return result


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    result = run_example(example, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr


def test_persistent_keys_example_keeps_fingerprints(tmp_path: Path) -> None:
    script = EXAMPLES_DIR / "03_persistent_keys.py"
    if not script.exists():
        pytest.skip("examples/03_persistent_keys.py is not written yet")
    first = FINGERPRINT_RE.findall(run_example(script, tmp_path).stdout)
    second = FINGERPRINT_RE.findall(run_example(script, tmp_path).stdout)
    assert first, "the example should print the agents' fingerprints"
    assert set(first) == set(second)
