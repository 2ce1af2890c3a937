"""The soak works: ``benchmarks/soak.py --short`` passes, and its leak checks can fail.

The short run (both backends, faults injected throughout) must report every
figure and pass every check; the slope checker is fed synthetic series, flat
and leaking, and must tell them apart.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module    # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _series(n: int, per_handshake: float, noise: float, seed: int = 0) -> list[dict[str, float]]:
    """RSS samples every 100 handshakes: 40 MiB, growing ``per_handshake`` bytes, +- noise."""
    rng = random.Random(seed)
    return [{"handshakes": h, "rss": 40 * 2**20 + h * per_handshake + rng.uniform(-noise, noise)}
            for h in range(0, n + 1, 100)]


def test_the_slope_check_flags_a_leak_of_one_small_object_per_handshake() -> None:
    soak = _soak()
    bound = 32 * 1024    # the heap's default: 32 KiB per 1000 handshakes
    # 64 bytes per handshake among noise of +-512 KiB (what healthy runs show)
    leaking = soak.slope_check(_series(50_000, 64, 512 * 1024), "rss", 10_000, bound)
    assert not leaking["ok"]
    assert leaking["slope"] == pytest.approx(64_000, rel=0.1)
    flat = soak.slope_check(_series(50_000, 0, 512 * 1024), "rss", 10_000, bound)
    assert flat["ok"], flat
    # the warm-up's growth is not counted
    warm = _series(50_000, 0, 0)
    for s in warm[:100]:
        s["rss"] -= (10_000 - s["handshakes"]) * 500
    assert soak.slope_check(warm, "rss", 10_000, bound)["ok"]
    assert not soak.slope_check(warm, "rss", 0, bound)["ok"]
    # too few samples after the warm-up to judge: not a pass
    assert not soak.slope_check(_series(300, 0, 0), "rss", 0, bound)["ok"]


def test_fit_slope_is_least_squares() -> None:
    soak = _soak()
    assert soak.fit_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2)
    assert soak.fit_slope([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)
    assert soak.fit_slope([5, 5], [1, 2]) == 0.0
    assert soak.parse_size("1GiB") == 2**30 and soak.parse_size("6MiB") == 6 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_short_soak_passes_with_every_fault_injected(tmp_path: Path) -> None:
    pytest.importorskip("trio")
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--short",
                        "--out", str(out)], capture_output=True, text=True, timeout=240,
                       cwd=ROOT)   # the package this interpreter imports (a wheel in CI's systems)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {p["backend"]: {k: c for k, c in p["checks"].items() if not c["ok"]}
              for p in report["phases"]}
    assert r.returncode == 0 and report["ok"], failed
    assert [p["backend"] for p in report["phases"]] == ["asyncio", "trio"]
    for p in report["phases"]:
        assert p["handshakes"]["started"] == p["handshakes"]["planned"] > 0
        assert p["bytes"]["verified"] > 0
        faults = p["faults_injected"]
        for kind in ("eagain", "early", "duplicate", "err", "late_windows"):
            assert faults[kind] > 0, (p["backend"], faults)
        assert p["offload"]["queue_full"] >= faults["eagain"]
        # each ERR failed its connection, cleanly
        assert sum(p["failures"]["client"].values()) >= 1
        assert p["counters"]["end"]["live"] == p["counters"]["start"]["live"]
        assert len(p["samples"]) >= 20 and len(p["quiet_points"]) >= 5
        for key in ("start", "after_warmup", "end"):
            assert p["rss"][key] > 0 and p["fds"][key] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_short_soak_fails_a_leak_of_one_small_ssl_object_per_connection(
        tmp_path: Path) -> None:
    """The short run's bounds (4 KiB heap, 8 KiB RSS per handshake) see a 16 KiB leak.

    16 KiB is less than one SSL object with its record buffers, what a leaked
    connection costs; the leak is made by the soak itself (``--inject-leak``).
    """
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--short",
                        "--backend", "asyncio", "--inject-leak", str(16 * 1024),
                        "--out", str(out)], capture_output=True, text=True, timeout=240,
                       cwd=ROOT)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    (phase,) = report["phases"]
    assert r.returncode != 0 and not report["ok"]
    checks = phase["checks"]
    assert not checks["heap_slope"]["ok"] and not checks["rss_slope"]["ok"], checks
    failing = {k for k, c in checks.items() if not c["ok"]}
    assert failing <= {"heap_slope", "rss_slope"}, failing
