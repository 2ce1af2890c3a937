"""A server flooded with connections dropped at random points of the handshake.

    python benchmarks/flood.py [--connections 20000] [--seconds 600] [--backend asyncio]
                               [--concurrency 200] [--key rsa] [--out flood.json]

Theory of operation
-------------------
The server is ours, alone in a child process so that its memory and
descriptors are its own: an anyio :class:`~anyio_asyncssl.stream.AsyncTLSListener`
(offload on, ``--backend`` asyncio or trio) echoing whatever a client sends.
Its workers run at normal priority (``--priority``): the load generator
shares the cores, and workers at the default nice 19 would wait behind it.
On SIGUSR1 it collects garbage and prints one ``STATS {json}`` line: its RSS
and descriptors from ``/proc/self``, :func:`anyio_asyncssl.connection_counters`
(connections live, parked, paused), :meth:`Offload.stats` (operations in
flight) and the handshake failures it saw, by type.

This process drives it.  ``--connections`` droppers, at most
``--concurrency`` at a time, each a raw socket with the stdlib's ``SSLObject``
on memory BIOs so it can stop anywhere, and each hanging up at a random point
of the handshake:

* ``connect``: right after the TCP connection;
* ``partial_hello``: after part of a real ClientHello;
* ``full_hello``: after the whole ClientHello (the server starts signing);
* ``server_flight``: after receiving the server's whole first flight;
* ``mid_finished``: half way through sending the client's Finished flight;

each with a FIN or with a RST (``SO_LINGER`` 0).  Meanwhile a good client
(the stdlib's TLS through ``asyncio.open_connection``) does a full handshake
and an echo every ``--good-interval`` seconds: every one must succeed, and
its latency is reported.

Phases: warm-up (a few hundred droppers and good clients, so that pools,
caches and the allocator's arenas exist), settle, baseline STATS; the flood
(RSS and descriptors sampled every 0.2 s for the peak); settle (until the
server's descriptors are back at the baseline, bounded), final STATS.

It fails (exit status 1) when a good client failed, when the descriptors do
not come back to the baseline, when connections stay live, parked or paused
or offloaded operations stay in flight, when the flood took longer than
``--seconds``, or when the final RSS exceeds the baseline by more than
``--rss-bound-mib`` once both are measured after ``malloc_trim(0)``, or when
the final RSS is above the flood's peak by as much.  Untrimmed, the RSS stays
near the flood's peak: glibc keeps freed memory in its per-thread arenas (the
loop thread's and each offload worker's) and returns only what is at the top
of a heap, so a burst of hundreds of concurrent handshakes leaves the RSS
20-25 MiB above the baseline with nothing leaked (measured: 22.8 MiB after
20,000 connections, every connection freed).  Trimmed, what is left is what
is still allocated; the 20 MiB bound is that measure's noise and caches with
room to spare, while a leak grows with the connections (20,000 leaked SSL
objects would be well over 100 MiB), and the leak counters catch it exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DROP_POINTS = ("connect", "partial_hello", "full_hello", "server_flight", "mid_finished")
ENDINGS = ("fin", "rst")
STEP_TIMEOUT = 15.0      # one dropper's whole life, at most
SETTLE_SECONDS = 60.0    # how long the server may take to close what was dropped

SERVER = r'''
import ctypes, gc, json, logging, os, signal, ssl, sys
from collections import Counter
from dataclasses import asdict
import anyio
from anyio.abc import SocketAttribute
import anyio_asyncssl as A
from anyio_asyncssl.dispatch import current_dispatcher
from anyio_asyncssl.stream import AsyncTLSListener

logging.disable(logging.CRITICAL)   # the dropped handshakes are the point
certfile, backend, handshake_timeout, priority = sys.argv[1:5]
handshake_timeout = float(handshake_timeout)
offload = A.Offload(workers=2, priority=priority)
ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
ctx.load_cert_chain(certfile)
failures = Counter()
served = 0

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

def stats():
    gc.collect()
    A.reap_parked()
    d = current_dispatcher()
    before_trim = rss()
    ctypes.CDLL(None).malloc_trim(0)   # hand back what malloc keeps free
    return {"rss": before_trim, "rss_trimmed": rss(), "fds": len(os.listdir("/proc/self/fd")),
            "dispatcher": {"wakeups": d.wakeups, "wait_timeouts": d.timeouts,
                           "job_waits": d.job_waits},
            "counters": A.connection_counters(), "offload": asdict(offload.stats()),
            "handshake_failures": dict(failures), "served": served}

class Listener(AsyncTLSListener):
    async def handle_handshake_error(self, exc, stream):
        failures[type(exc).__name__] += 1
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc

async def echo(stream):
    global served
    served += 1
    try:
        async with stream:
            while True:
                await stream.send(await stream.receive())
    except Exception:
        pass

async def main():
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0, backlog=4096)
    listener = Listener(tcp, ctx, handshake_timeout=handshake_timeout)
    print("READY", tcp.extra(SocketAttribute.local_port), flush=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        with anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
            async for signum in signals:
                print("STATS", json.dumps(stats()), flush=True)
                if signum == signal.SIGTERM:
                    tg.cancel_scope.cancel()
                    break

anyio.run(main, backend=backend)
'''


# -- the server child ------------------------------------------------------------------
class Server:
    """Our server in a child process; its STATS on demand; /proc readings of it."""

    def __init__(self, certfile: Path, backend: str, handshake_timeout: float,
                 priority: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(certfile), backend, str(handshake_timeout),
             priority],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stats(self, signum: int = signal.SIGUSR1) -> dict[str, Any]:
        assert self.proc.stdout is not None
        self.proc.send_signal(signum)
        line = self.proc.stdout.readline()
        if not line.startswith("STATS "):
            raise RuntimeError(f"the server answered {line!r}")
        result: dict[str, Any] = json.loads(line[6:])
        return result

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> dict[str, Any] | None:
        try:
            final = self.stats(signal.SIGTERM) if self.proc.poll() is None else None
            self.proc.wait(timeout=20)
            return final
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


# -- the clients -------------------------------------------------------------------------
@dataclass
class Tally:
    drops: dict[str, int] = field(default_factory=dict)
    dropper_errors: dict[str, int] = field(default_factory=dict)
    good_ok: int = 0
    good_failed: int = 0
    good_errors: list[str] = field(default_factory=list)
    good_latency: list[float] = field(default_factory=list)


def dropper_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def drop_one(port: int, point: str, ending: str, ctx: ssl.SSLContext,
                   rng: random.Random) -> None:
    """Connect, go as far as ``point`` in the handshake, then hang up with ``ending``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if point != "connect":
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = outgoing.read()
            if point == "partial_hello":
                await loop.sock_sendall(sock, hello[:rng.randrange(1, len(hello))])
            else:
                await loop.sock_sendall(sock, hello)
            if point in ("server_flight", "mid_finished"):
                finished = b""
                while not finished:   # until the server's flight is all in
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionResetError("the server closed")
                    incoming.write(data)
                    try:
                        obj.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    finished = outgoing.read()
                if point == "mid_finished":
                    await loop.sock_sendall(sock, finished[:max(1, len(finished) // 2)])
    finally:
        if ending == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def droppers(port: int, count: int, concurrency: int, tally: Tally, seed: int) -> None:
    ctx = dropper_context()
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)

    async def one(point: str, ending: str) -> None:
        try:
            await asyncio.wait_for(drop_one(port, point, ending, ctx, rng), STEP_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            name = type(exc).__name__
            tally.dropper_errors[name] = tally.dropper_errors.get(name, 0) + 1
        finally:
            slots.release()

    tasks = set()
    for _ in range(count):
        await slots.acquire()
        point, ending = rng.choice(DROP_POINTS), rng.choice(ENDINGS)
        key = f"{point}/{ending}"
        tally.drops[key] = tally.drops.get(key, 0) + 1
        task = asyncio.ensure_future(one(point, ending))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def good_clients(port: int, cafile: Path, interval: float, stop: asyncio.Event,
                       tally: Tally) -> None:
    """A full handshake and an echo started every ``interval`` s until ``stop`` (10 at most
    at once: a saturated server queues them in its accept backlog with the droppers)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    slots = asyncio.Semaphore(10)
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        start = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), STEP_TIMEOUT)
            try:
                writer.write(b"ping")
                got = await asyncio.wait_for(reader.readexactly(4), STEP_TIMEOUT)
                if got != b"ping":
                    raise ValueError(f"echo answered {got!r}")
            finally:
                writer.close()
            tally.good_ok += 1
            tally.good_latency.append(time.monotonic() - start)
        except Exception as exc:
            tally.good_failed += 1
            if len(tally.good_errors) < 10:
                tally.good_errors.append(repr(exc))
        finally:
            slots.release()

    while not stop.is_set():
        await slots.acquire()
        task = asyncio.ensure_future(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    await asyncio.gather(*tasks)


def accept_backlog(port: int) -> int:
    """Connections waiting in the listen backlog of 127.0.0.1:``port`` (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":   # LISTEN: rx_queue is the backlog
                return int(fields[4].split(":")[1], 16)
    return 0


async def sample_peak(server: Server, stop: asyncio.Event, peak: dict[str, int]) -> None:
    while not stop.is_set():
        peak["rss"] = max(peak["rss"], server.rss())
        peak["fds"] = max(peak["fds"], server.fds())
        peak["accept_backlog"] = max(peak.get("accept_backlog", 0), accept_backlog(server.port))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def flood_phase(server: Server, args: argparse.Namespace, cafile: Path, count: int,
                      tally: Tally, peak: dict[str, int], seed: int) -> float:
    stop = asyncio.Event()
    start = time.monotonic()
    good = asyncio.ensure_future(good_clients(server.port, cafile, args.good_interval, stop,
                                              tally))
    sampler = asyncio.ensure_future(sample_peak(server, stop, peak))
    try:
        await droppers(server.port, count, args.concurrency, tally, seed)
    finally:
        stop.set()
        await asyncio.gather(good, sampler)
    return time.monotonic() - start


def settle(server: Server, fds: int, bound: float) -> float:
    """Wait until the server's descriptors are back at ``fds`` (bounded); the seconds."""
    start = time.monotonic()
    while server.fds() > fds and time.monotonic() - start < bound:
        time.sleep(0.1)
    time.sleep(0.5)   # let what closed free its memory too
    return time.monotonic() - start


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from anyio_asyncssl.selfsigned import generate_self_signed

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("localhost", key_type=args.key)
        certfile = Path(tmp) / "server.pem"
        certfile.write_bytes(key + cert)
        cafile = Path(tmp) / "ca.pem"
        cafile.write_bytes(cert)
        server = Server(certfile, args.backend, args.handshake_timeout, args.priority)
        try:
            warm = Tally()
            warm_peak = {"rss": 0, "fds": 0}
            asyncio.run(flood_phase(server, args, cafile, args.warmup, warm, warm_peak, 1))
            time.sleep(1.0)
            baseline = server.stats()
            tally = Tally()
            peak = {"rss": baseline["rss"], "fds": baseline["fds"]}
            seconds = asyncio.run(flood_phase(server, args, cafile, args.connections, tally,
                                              peak, args.seed))
            settled = settle(server, baseline["fds"], SETTLE_SECONDS)
            final = server.stats()
        finally:
            server.stop()
    lat = tally.good_latency
    result = {
        "config": vars(args),
        "flood_seconds": seconds,
        "connections_per_second": args.connections / seconds if seconds else 0.0,
        "settle_seconds": settled,
        "rss_mib": {"baseline": baseline["rss"] / 2**20, "peak": peak["rss"] / 2**20,
                    "final": final["rss"] / 2**20,
                    "growth": (final["rss"] - baseline["rss"]) / 2**20,
                    "baseline_trimmed": baseline["rss_trimmed"] / 2**20,
                    "final_trimmed": final["rss_trimmed"] / 2**20,
                    "growth_trimmed": (final["rss_trimmed"] - baseline["rss_trimmed"]) / 2**20},
        "fds": {"baseline": baseline["fds"], "peak": peak["fds"], "final": final["fds"]},
        "accept_backlog_peak": peak.get("accept_backlog", 0),
        "good_clients": {"ok": tally.good_ok, "failed": tally.good_failed,
                         "errors": tally.good_errors,
                         "latency_ms": {"p50": percentile(lat, 0.5) * 1000,
                                        "p99": percentile(lat, 0.99) * 1000,
                                        "max": max(lat, default=0.0) * 1000}},
        "warmup_good_clients": {"ok": warm.good_ok, "failed": warm.good_failed},
        "drops": tally.drops,
        "dropper_errors": tally.dropper_errors,
        "server_baseline": baseline,
        "server_final": final,
    }
    result["failures"] = check(result, args)
    return result


def check(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What makes the run fail; empty when it passed."""
    failures = []
    good = r["good_clients"]
    if good["failed"] or r["warmup_good_clients"]["failed"]:
        failures.append(f"good clients failed: {good['errors']}")
    if good["ok"] == 0:
        failures.append("no good client was served during the flood")
    if r["fds"]["final"] > r["fds"]["baseline"]:
        failures.append(f"descriptors: {r['fds']['final']} > baseline {r['fds']['baseline']}")
    before, after = r["server_baseline"]["counters"], r["server_final"]["counters"]
    # (anyio's accept loop keeps the last stream it accepted until the next one)
    if after["live"] > before["live"] + 1:
        failures.append(f"connections live: {after['live']} (baseline {before['live']})")
    if after["parked_now"] or after["paused_now"]:
        failures.append(f"parked {after['parked_now']}, paused {after['paused_now']}")
    if r["server_final"]["offload"]["in_flight"]:
        failures.append(f"offload in flight: {r['server_final']['offload']['in_flight']}")
    if r["flood_seconds"] > args.seconds:
        failures.append(f"the flood took {r['flood_seconds']:.1f} s > {args.seconds} s")
    rss = r["rss_mib"]
    if rss["growth_trimmed"] > args.rss_bound_mib:
        failures.append(f"RSS grew {rss['growth_trimmed']:.1f} MiB (after malloc_trim) "
                        f"> {args.rss_bound_mib} MiB")
    if rss["final"] > rss["peak"] + args.rss_bound_mib:
        failures.append(f"RSS grew past the flood's peak: {rss['final']:.1f} MiB")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=900.0,
                        help="fail if the flood takes longer (default: %(default)s)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="droppers in flight at once (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--good-interval", type=float, default=0.05)
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    parser.add_argument("--key", choices=("rsa", "ec"), default="rsa")
    parser.add_argument("--priority", choices=("low", "normal", "idle"), default="normal",
                        help="the offload workers' (default: %(default)s: this load "
                        "generator shares the machine's cores, and low-priority workers "
                        "would queue behind it)")
    parser.add_argument("--rss-bound-mib", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=20000)
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    summary = {k: result[k] for k in ("flood_seconds", "connections_per_second", "rss_mib",
                                      "fds", "accept_backlog_peak", "failures")}
    summary["good_clients"] = {k: v for k, v in result["good_clients"].items() if k != "errors"}
    print(json.dumps(summary, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
