"""The scenarios: one run of one peer, and the interleaved repetitions of all of them."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import peers as P

HERE = Path(__file__).resolve().parent
LOAD = ["-m", "anyio_asyncssl.bench.load"]
SERVER_CPU = {0}   # the saturated and bulk scenarios pin the server here
LOAD_CPU = {1}     # and the load here

Log = Callable[[str], None]


@dataclass
class Config:
    mode: str
    reps: int
    sat_seconds: float
    half_seconds: float
    warmup_seconds: float
    bulk_mib: float
    mem_connections: int
    keys: list[str]
    half_keys: list[str]
    concurrency: int = 16
    scenarios: list[str] = field(default_factory=lambda: ["saturated", "half", "bulk",
                                                          "memory"])


def config(mode: str) -> Config:
    if mode == "smoke":
        return Config("smoke", 1, 0.5, 0.5, 0.1, 1, 20, ["rsa2048"], ["rsa2048"])
    if mode == "quick":
        return Config("quick", 1, 1.5, 1.5, 0.3, 32, 200, ["rsa2048", "rsa3072", "p256"],
                      ["rsa2048", "rsa3072"])
    return Config("full", 3, 4.0, 4.0, 0.5, 256, 1000, ["rsa2048", "rsa3072", "p256"],
                  ["rsa2048", "rsa3072"])


def make_certs(tmp: Path) -> dict[str, tuple[str, str]]:
    from anyio_asyncssl import generate_self_signed

    out = {}
    for name, kind, bits in (("rsa2048", "rsa", 2048), ("rsa3072", "rsa", 3072),
                             ("p256", "ec", 256)):
        cert, key = generate_self_signed("localhost", key_type=kind, bits=bits)
        (tmp / f"{name}.crt").write_bytes(cert)
        (tmp / f"{name}.key").write_bytes(key)
        (tmp / f"{name}.pem").write_bytes(key + cert)
        out[name] = (str(tmp / f"{name}.crt"), str(tmp / f"{name}.key"))
    return out


def load(args: list[str], cpus: set[int] | None, timeout: float) -> dict[str, Any]:
    r = subprocess.run([sys.executable, *LOAD, *args], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=P.pin(cpus))
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"load {args[0]} failed: {last_line(r.stderr)}")


def last_line(text: str) -> str:
    """The last line of a traceback: the exception, which is what a report can show."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


# -- one run -------------------------------------------------------------------------

def run_handshakes(peer: str, cert: tuple[str, str], cfg: Config, seconds: float,
                   rate: float | None, pinned: bool) -> dict[str, Any]:
    srv_cpus, load_cpus = (SERVER_CPU, LOAD_CPU) if pinned else (None, None)
    with P.start(peer, *cert, srv_cpus, "saturated") as srv:
        port = str(srv.port)
        conc = ["--concurrency", str(cfg.concurrency)]
        load(["handshake", port, *conc, "--seconds", str(cfg.warmup_seconds)], load_cpus, 60)
        srv.begin()
        extra = ["--rate", f"{rate:.1f}"] if rate else []
        cl = load(["handshake", port, *conc, "--seconds", str(seconds), *extra], load_cpus,
                  seconds + 60)
        sv = srv.finish()
    if cl["handshakes"] == 0:
        raise RuntimeError(f"no handshake completed ({cl['errors']} failed)")
    n = cl["handshakes"]
    out = {"hs_per_s": cl["rate"], "cpu_ms_per_hs": 1e3 * sv["cpu_s"] / n,
           "load_busy": cl["client_busy"], "hs_latency_p99_ms": cl["latency_p99_ms"],
           "client_errors": cl["errors"], "server": sv, "client": cl}
    if "loop_cpu_s" in sv:
        out["loop_cpu_ms_per_hs"] = 1e3 * sv["loop_cpu_s"] / n
    if "lag_p99_ms" in sv:
        out["lag_p99_ms"] = sv["lag_p99_ms"]
        out["lag_max_ms"] = sv["lag_max_ms"]
    if rate:
        out["target_rate"] = rate
    return out


def run_bulk(peer: str, cert: tuple[str, str], cfg: Config) -> dict[str, Any]:
    with P.start(peer, *cert, SERVER_CPU, "bulk") as srv:
        srv.begin()
        cl = load(["bulk", str(srv.port), "--mib", str(cfg.bulk_mib)], LOAD_CPU, 900)
        sv = srv.finish()
    out = {"mib_per_s": cfg.bulk_mib / cl["seconds"],
           "cpu_ms_per_mib": 1e3 * sv["cpu_s"] / cfg.bulk_mib,
           "load_busy": cl["client_busy"], "server": sv, "client": cl}
    if "loop_cpu_s" in sv:
        out["loop_cpu_ms_per_mib"] = 1e3 * sv["loop_cpu_s"] / cfg.bulk_mib
    if "lag_max_ms" in sv:
        out["lag_max_ms"] = sv["lag_max_ms"]
    return out


def run_memory(peer: str, cert: tuple[str, str], cfg: Config) -> dict[str, Any]:
    n = cfg.mem_connections
    with P.start(peer, *cert, None, "memory") as srv:
        srv.begin()
        proc = subprocess.Popen([sys.executable, *LOAD, "hold", str(srv.port),
                                 "--connections", str(n)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            if not line.startswith("OPEN "):
                raise RuntimeError(f"hold failed: {last_line(proc.communicate(timeout=30)[1])}")
            time.sleep(0.2)  # let the server settle (handlers parked in receive)
            sv = srv.finish()
            proc.stdin.write("close\n")
            proc.stdin.flush()
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"kib_per_conn": (sv["rss"] - sv["rss0"]) / n / 1024, "server": sv}


def run_sansio_memory(kind: str, pem: str, cfg: Config) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "anyio_asyncssl.bench.sansio_memory", kind, pem,
                        str(cfg.mem_connections)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ))
    if r.returncode:
        raise RuntimeError(last_line(r.stderr))
    return {"kib_per_conn": json.loads(r.stdout)["kib_per_connection"]}


# -- the load generator's own cost ----------------------------------------------------

def calibrate_load(cert: tuple[str, str], seconds: float, log: Log) -> dict[str, Any]:
    """CPU per handshake of `openssl s_time` and of our epoll client, against s_server."""
    port = P.free_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}",
                            "-cert", cert[0], "-key", cert[1], "-quiet", "-naccept", "1000000"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, preexec_fn=P.pin(SERVER_CPU))
    out: dict[str, Any] = {}
    try:
        P.wait_listening_tls(port)
        t0 = os.times()
        r = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                            "-time", str(max(1, round(seconds)))], capture_output=True,
                           text=True, timeout=seconds + 30, preexec_fn=P.pin(LOAD_CPU))
        t1 = os.times()
        n = 0
        for line in r.stdout.splitlines():
            if "connections in" in line and "real seconds" in line:
                n = int(line.split()[0])
        cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
        out["s_time"] = {"handshakes": n, "cpu_ms_per_hs": 1e3 * cpu / max(n, 1)}
        cl = load(["handshake", str(port), "--concurrency", "1", "--seconds", str(seconds)],
                  LOAD_CPU, seconds + 30)
        out["epoll_client"] = {"handshakes": cl["handshakes"],
                               "cpu_ms_per_hs": 1e3 * cl["client_cpu_s"]
                               / max(cl["handshakes"], 1)}
    finally:
        srv.kill()
        srv.wait()
    log(f"  load generators against openssl s_server (RSA-2048), client CPU per handshake: "
        f"s_time {out['s_time']['cpu_ms_per_hs']:.2f} ms, "
        f"epoll client {out['epoll_client']['cpu_ms_per_hs']:.2f} ms")
    return out


# -- interleaved repetitions -------------------------------------------------------------

Results = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]


def _one(results: Results, scenario: str, variant: str, peer: str,
         fn: Callable[[], dict[str, Any]],
         log: Log) -> None:
    t0 = time.perf_counter()
    try:
        r = fn()
    except Exception as exc:  # recorded in the report, the run goes on
        r = {"error": f"{type(exc).__name__}: {exc}"}
    results.setdefault(scenario, {}).setdefault(variant, {}).setdefault(peer, []).append(r)
    brief = r.get("error") or ", ".join(
        f"{k}={r[k]:.3g}" for k in ("hs_per_s", "cpu_ms_per_hs", "lag_p99_ms", "lag_max_ms",
                                     "mib_per_s", "cpu_ms_per_mib", "kib_per_conn", "load_busy")
        if k in r)
    log(f"  {scenario:9s} {variant:8s} {peer:34s} {brief}  ({time.perf_counter() - t0:.1f} s)")


def median_of(results: Results, scenario: str, variant: str, peer: str, key: str) -> float | None:
    vals = [r[key] for r in results.get(scenario, {}).get(variant, {}).get(peer, [])
            if key in r]
    return statistics.median(vals) if vals else None


def run_all(cfg: Config, ids: list[str], certs: dict[str, tuple[str, str]], tmp: Path,
            log: Log) -> Results:
    res: Results = {}

    def peers_for(scenario: str) -> list[str]:
        return [p for p in ids if scenario in P.BY_ID[p].scenarios]

    if "saturated" in cfg.scenarios:
        for key in cfg.keys:
            for rep in range(cfg.reps):
                log(f"saturated {key}, repetition {rep + 1}/{cfg.reps}")
                for p in peers_for("saturated"):
                    _one(res, "saturated", key, p, partial(
                        run_handshakes, p, certs[key], cfg, cfg.sat_seconds, None,
                        pinned=True), log)
    if "half" in cfg.scenarios:
        for key in cfg.half_keys:
            cap = median_of(res, "saturated", key, P.BASELINE, "hs_per_s")
            if cap is None:
                log(f"half {key}: measuring trio.SSLStream's capacity first")
                cap = run_handshakes(P.BASELINE, certs[key], cfg, cfg.sat_seconds, None,
                                     pinned=True)["hs_per_s"]
            rate = cap / 2
            res.setdefault("half-rate", {})[key] = {"rate": [{"rate": rate, "capacity": cap}]}
            for rep in range(cfg.reps):
                log(f"half load {key} at {rate:.0f} handshakes/s, repetition "
                    f"{rep + 1}/{cfg.reps}")
                for p in peers_for("half"):
                    _one(res, "half", key, p, partial(
                        run_handshakes, p, certs[key], cfg, cfg.half_seconds, rate,
                        pinned=False), log)
    if "bulk" in cfg.scenarios:
        for rep in range(cfg.reps):
            log(f"bulk {cfg.bulk_mib:g} MiB each way, repetition {rep + 1}/{cfg.reps}")
            for p in peers_for("bulk"):
                _one(res, "bulk", "p256", p, partial(run_bulk, p, certs["p256"], cfg), log)
    if "memory" in cfg.scenarios:
        pem = str(tmp / "p256.pem")
        for rep in range(cfg.reps):
            log(f"memory, {cfg.mem_connections} idle connections, repetition "
                f"{rep + 1}/{cfg.reps}")
            for p in peers_for("memory"):
                _one(res, "memory", "p256", p, partial(run_memory, p, certs["p256"], cfg),
                     log)
            for kind in ("stdlib-sslobject", "asyncssl", "asyncssl-offload"):
                _one(res, "memory-sansio", "p256", kind,
                     partial(run_sansio_memory, kind, pem, cfg), log)
    return res


def have_openssl_cli() -> bool:
    return shutil.which("openssl") is not None
