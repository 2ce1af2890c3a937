"""The benchmark harness works: ``benchmarks/run.py --smoke`` touches every scenario.

It runs each scenario once with a tiny size against our peers and trio.SSLStream
(nginx and socat only when already installed: the smoke mode installs nothing),
and must produce a number for each, plus RESULTS.md and results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="the harness needs Linux /proc and 2 CPUs")

OURS = ["asyncssl-trio", "asyncssl-trio-nooffload", "asyncssl-anyio-asyncio",
        "asyncssl-anyio-asyncio-nooffload", "asyncssl-anyio-trio",
        "asyncssl-anyio-trio-nooffload"]
EXPECT = {
    ("saturated", "rsa2048"): ("hs_per_s", "cpu_ms_per_hs", "loop_cpu_ms_per_hs", "lag_p99_ms",
                               "lag_max_ms"),
    ("half", "rsa2048"): ("hs_per_s", "lag_p99_ms", "lag_max_ms"),
    ("bulk", "p256"): ("mib_per_s", "cpu_ms_per_mib"),
    ("memory", "p256"): ("kib_per_conn",),
}


def test_smoke_run_measures_every_scenario(tmp_path: Path) -> None:
    pytest.importorskip("trio")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["mode"] == "smoke"
    scen = res["scenarios"]
    for (scenario, variant), metrics in EXPECT.items():
        runs = scen[scenario][variant]
        for peer in [*OURS, "trio-sslstream"]:
            assert peer in runs, (scenario, peer)
            (run,) = runs[peer]
            assert "error" not in run, (scenario, peer, run)
            for m in metrics:
                assert isinstance(run.get(m), float), (scenario, peer, m, run)
    for peer in ("asyncssl-trio-always", "asyncssl-anyio-asyncio-always",
                 "asyncssl-anyio-trio-always"):
        assert scen["bulk"]["p256"][peer][0]["mib_per_s"] > 0
    for kind in ("stdlib-sslobject", "asyncssl", "asyncssl-offload"):
        assert "kib_per_conn" in scen["memory-sansio"]["p256"][kind][0]
    # the offload really signed in the peers that have it
    sat = scen["saturated"]["rsa2048"]
    assert sat["asyncssl-trio"][0]["server"]["offload"]["sign_ops"] > 0
    assert "offload" not in sat["asyncssl-trio-nooffload"][0]["server"]
    # C references either ran or say why not
    for peer in ("nginx", "socat"):
        assert peer in res["peers"] or peer in res["missing"]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Targets" in md and "trio.SSLStream" in md


def test_uvicorn_storm_runs_all_three_servers(tmp_path: Path) -> None:
    """``benchmarks/uvicorn_storm.py`` in miniature: every variant serves and ticks."""
    pytest.importorskip("uvicorn", reason="pip install uvicorn")
    out = tmp_path / "storm.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "uvicorn_storm.py"), "--seconds", "1",
         "--concurrency", "2", "--bits", "2048", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"stock", "offload", "inline"}
    for variant, r in results.items():
        assert r["load"]["handshakes"] > 0, variant
        assert r["ticks"] > 100, variant
        assert r["p99_ratio"] > 0, variant


def test_a_starved_server_stretches_the_handshake_window_instead_of_failing(
        tmp_path: Path) -> None:
    """A server too slow to finish a handshake in the window (a loaded machine) still gets
    a rate: the window stretches until one completes, and the rate is over its real length."""
    import socket
    import ssl
    import threading
    import time

    from anyio_asyncssl.selfsigned import generate_self_signed

    cert, key = generate_self_signed("localhost")
    (tmp_path / "server.pem").write_bytes(key + cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    delay = 1.0
    stop = threading.Event()

    def serve() -> None:          # one handshake at a time, each after a 1 s stall
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            time.sleep(delay)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = subprocess.run([sys.executable, "-m", "anyio_asyncssl.bench.load", "handshake",
                            str(port), "--concurrency", "1", "--seconds", "0.2"],
                           capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    res = json.loads(line[7:])
    assert res["handshakes"] >= 1, res
    assert res["seconds"] >= delay, res            # the window was stretched...
    assert res["rate"] == pytest.approx(res["handshakes"] / res["seconds"])  # ...and counted
