"""``benchmarks/flood.py`` in miniature: 500 connections dropped at random points of
the handshake, good clients served throughout, the server back to its descriptors and
within its RSS bound afterwards (the script's own checks: it exits 1 otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the script reads the server's /proc")


def test_a_flood_of_dropped_handshakes_leaves_the_server_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "flood.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "flood.py"), "--connections", "500",
         "--warmup", "100", "--seconds", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert result["good_clients"]["ok"] >= 1 and result["good_clients"]["failed"] == 0
    assert result["fds"]["final"] <= result["fds"]["baseline"]
    # every drop point was exercised, with both endings
    assert len(result["drops"]) == 10, result["drops"]
    assert sum(result["drops"].values()) == 500
