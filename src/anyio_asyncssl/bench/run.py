"""Benchmark harness: anyio-asyncssl against its peers, in the same run, over loopback.

    python benchmarks/run.py              # full: 3 interleaved repetitions (~22 min on 2 cores)
    python benchmarks/run.py --quick      # every peer and scenario, shorter, 1 repetition (~4 min)
    python benchmarks/run.py --smoke      # ~35 s; proves the harness works (pytest runs it)
    python benchmarks/run.py --only bulk --peers asyncssl-trio,trio-sslstream

Scenarios (bench/scenarios.py): ``saturated`` (C=16 full TLS 1.3 handshakes,
server pinned to CPU 0 and load to CPU 1; RSA-2048, RSA-3072, ECDSA P-256),
``half`` (a fixed rate of half of trio.SSLStream's saturated rate, nothing
pinned), ``bulk`` (256 MiB echoed each way on one connection), ``memory``
(RSS per idle connection with 1,000 open, and the sans-IO comparison with the
stdlib's SSLObject).  Peers (bench/peers.py): this library's trio face and
anyio face on both backends, offload on and off (and ``async_mode="always"``
for bulk), trio.SSLStream, anyio's TLSStream on trio and asyncio, asyncio's
``start_server(ssl=)``, uvloop, nginx and socat.  Missing peers are installed
(pip, or apt-get when root) unless ``--no-install``; a peer that still cannot
run is listed in RESULTS.md with the reason.

Writes RESULTS.md, results.json and results.png (with the ``plot`` extra:
matplotlib) into ``--out`` (benchmarks/run.py: benchmarks/).  The harness lives in
the package (anyio_asyncssl.bench) so that ``asyncssl bench`` (cli/bench.py)
reuses it; benchmarks/run.py is its command line in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import peers as P
from . import report as R
from . import scenarios as S

SMOKE_PEERS = [p.id for p in P.PEERS if p.group == P.OURS] + [P.BASELINE, "nginx", "socat"]

METHOD = [
    "Every server peer runs in its own process; the Python ones (bench/server.py) run a "
    "1 ms ticker task on their loop (lateness = actual minus expected sleep) and report "
    "handshakes, the CPU time of the whole process (os.times) and of the loop thread alone "
    "(/proc/self/task/<tid>/stat), the ticker's lag percentiles, RSS and Offload.stats(); "
    "counters are reset by a `start` line after a warm-up, read by a `stop` line.  The "
    "ticker costs the Python peers a little CPU the C references do not pay.",
    "Our peers use only the public API: TLSContext(PROTOCOL_TLS_SERVER, "
    "offload=Offload(workers=2) or None, async_mode=...), load_cert_chain; the trio face "
    "through TrioTLSListener + trio.serve_listeners, the anyio face through "
    "AsyncTLSListener(...).serve(handler).  Servers echo.",
    "Handshake load (bench/load.py): one Python process driving non-blocking stdlib ssl "
    "sockets from one epoll loop, full TLS 1.3 handshakes, no resumption, no certificate "
    "check, the socket closed right after the handshake (what `openssl s_time -new` does).  "
    "Chosen over s_time because it costs the load core less per handshake (calibration "
    "below) and keeps 16 handshakes in flight from one process instead of 16 processes; "
    "handshakes are counted by the client, and server CPU per handshake is the server's CPU "
    "over the client-counted handshakes.  OpenSSL 3.0's TLS 1.3 client side is expensive "
    "(about 1 ms of C per handshake): with ECDSA P-256 the load core, not the server, can be "
    "the limit (rows marked ‡).",
    "Half load: the same client paced by a token bucket (a new handshake every 1/rate s, up "
    "to 256 in flight); server and client not pinned, so a second core can sign.",
    "Bulk: one connection, the client (one thread, non-blocking stdlib ssl socket, epoll) "
    "writes 256 KiB chunks and reads the echo at the same time; MiB/s = MiB each way / time "
    "from the end of the handshake to the last echoed byte; server CPU per MiB echoed.  "
    "Python servers echo with receive(65536)/send.",
    "Memory: the client opens the connections one by one (handshake, one byte echoed), "
    "keeps them idle; the server's RSS growth (/proc/self/statm, after gc) over the number "
    "of connections.  The sans-IO table is the former benchmarks/memory.py: pairs over "
    "memory BIOs in one process, our TLSConnection against the stdlib's ssl.SSLObject.",
    "nginx: Debian's package, one worker, `daemon off`; handshakes against an http server "
    "that is never sent a request; bulk and memory through the stream module (TLS "
    "termination) proxying to a plain-TCP echo (bench/tcp_echo.py on uvloop, not pinned) "
    "whose CPU and memory are not counted (so nginx's bulk figure includes a proxy hop the "
    "Python peers do not make, and its memory figure nginx's upstream connection and "
    "buffers).  CPU = master + worker; loop thread = the worker.",
    "socat: `socat -b 65536 OPENSSL-LISTEN:port,fork,... PIPE` forks a process per "
    "connection and echoes through a pipe; CPU includes reaped children.  (Its PIPE echo "
    "worked here with TLS records of at most 16 KiB; as nginx's backend, fed 64 KiB reads, "
    "it deadlocked writing into its own full pipe.)",
]


def _print(msg: str) -> None:
    print(msg, flush=True)


#: where the harness's progress lines go (asyncssl bench draws a progress bar from them)
_sink: list[Callable[[str], None]] = [_print]


def log(msg: str) -> None:
    _sink[0](msg)


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    try:
        distro = next(x.split("=", 1)[1].strip('"') for x in
                      Path("/etc/os-release").read_text().splitlines()
                      if x.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        distro = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"CPU": model, "cores": str(os.cpu_count()), "kernel": platform.release(),
            "memory": mem, "OS": distro, "load average (1, 5, 15 min) at start": load}


def main(argv: list[str] | None = None, default_out: Path | None = None,
         log_to: Callable[[str], None] | None = None) -> None:
    _sink[0] = log_to or _print
    ap = argparse.ArgumentParser(prog="benchmarks/run.py",
                                 description=(__doc__ or "").split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="all peers, shorter, 1 repetition")
    mode.add_argument("--smoke", action="store_true",
                      help="seconds: each scenario once with a tiny size (our peers, trio)")
    ap.add_argument("--only", action="append", default=[],
                    help="scenario(s): saturated, half, bulk, memory (comma-separated)")
    ap.add_argument("--peers", help="comma-separated peer ids (default: all)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", type=Path, default=default_out or Path("."),
                    help="where RESULTS.md etc. go (benchmarks/run.py: benchmarks/)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not install missing peers (pip/apt-get)")
    ap.add_argument("--shared-note", default="",
                    help="a note printed at the top of RESULTS.md (e.g. a shared machine); "
                         "with --report-only it replaces the stored one")
    ap.add_argument("--list-peers", action="store_true")
    ap.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                    help="measure nothing: rewrite RESULTS.md and the chart from a results.json")
    a = ap.parse_args(argv)

    if a.report_only:
        stored: R.Results = json.loads(a.report_only.read_text())
        if a.shared_note:
            stored["meta"]["shared_machine_note"] = a.shared_note
        write_outputs(stored, a.out, time.perf_counter())
        return

    if a.list_peers:
        for peer in P.PEERS:
            print(f"{peer.id:36s} {peer.label}  [{', '.join(sorted(peer.scenarios))}]")
        return
    cfg = S.config("smoke" if a.smoke else "quick" if a.quick else "full")
    if a.reps:
        cfg.reps = a.reps
    only = [s for x in a.only for s in x.split(",") if s]
    for s in only:
        if s not in ("saturated", "half", "bulk", "memory"):
            ap.error(f"unknown scenario {s}")
    if only:
        cfg.scenarios = only
    ids = a.peers.split(",") if a.peers else (SMOKE_PEERS if a.smoke else
                                              [p.id for p in P.PEERS])
    for p in ids:
        if p not in P.BY_ID:
            ap.error(f"unknown peer {p} (see --list-peers)")
    if not S.have_openssl_cli():
        log("note: no `openssl` command: the load-generator calibration is skipped")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPUs (server on one, load on the other)")

    t0 = time.perf_counter()
    machine_info = machine()
    log(f"benchmarks/run.py {cfg.mode}: {cfg.reps} repetition(s), scenarios "
        f"{', '.join(cfg.scenarios)}, {len(ids)} peers")
    av = P.ensure_available(ids, install=not (a.no_install or a.smoke), log=log)
    for p, why in av.missing.items():
        log(f"  not available: {p}: {why}")
    run_ids = [p for p in ids if p in av.ok]

    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmpdir:
        tmp = Path(tmpdir)
        certs = S.make_certs(tmp)
        calibration: dict[str, Any] = {}
        if S.have_openssl_cli() and not a.smoke and "saturated" in cfg.scenarios:
            try:
                calibration = S.calibrate_load(certs["rsa2048"], 2.0 if cfg.reps > 1 else 1.0,
                                               log)
            except Exception as exc:
                calibration = {"error": str(exc)}
        results = S.run_all(cfg, run_ids, certs, tmp, log)

    method = list(METHOD)
    if calibration.get("s_time"):
        method.append(
            "Load generator calibration (this run, against `openssl s_server` pinned to CPU 0, "
            "RSA-2048, one handshake at a time): client CPU per handshake "
            f"`openssl s_time -new` {calibration['s_time']['cpu_ms_per_hs']:.2f} ms, "
            f"the epoll client {calibration['epoll_client']['cpu_ms_per_hs']:.2f} ms.")
    cmd = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(x)}" for x in (sys.argv[1:] if argv is None else argv))
    res: R.Results = {
        "meta": {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 "command": cmd, "machine": machine_info, "versions": P.versions(),
                 "method": method, "shared_machine_note": a.shared_note,
                 "elapsed_s": time.perf_counter() - t0},
        "config": {"mode": cfg.mode, "reps": cfg.reps, "saturated_seconds": cfg.sat_seconds,
                   "half_seconds": cfg.half_seconds, "bulk_mib": cfg.bulk_mib,
                   "mem_connections": cfg.mem_connections, "keys": cfg.keys,
                   "half_keys": cfg.half_keys, "concurrency": cfg.concurrency,
                   "scenarios": cfg.scenarios},
        "peers": run_ids, "missing": av.missing, "calibration": calibration,
        "scenarios": results,
    }
    res["meta"]["machine"]["load average (1, 5, 15 min) at the end"] = " ".join(
        f"{x:.2f}" for x in os.getloadavg())
    write_outputs(res, a.out, t0)


def write_outputs(res: R.Results, out: Path, t0: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    chart_msg = R.write_chart(res, out / "results.png")
    if chart_msg:
        log(f"chart skipped: {chart_msg}")
    R.write_markdown(res, out / "RESULTS.md", None if chart_msg else "results.png")
    log("")
    for line in R.console_summary(res):
        log(line)
    log(f"\nwrote {out / 'RESULTS.md'}, {out / 'results.json'}"
        + ("" if chart_msg else f", {out / 'results.png'}")
        + f" in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
