"""Soak: many handshakes and much data through offload, with the engine failing on a schedule.

    python benchmarks/soak.py                      # 50,000 handshakes, 1 GiB, both backends
    python benchmarks/soak.py --short --out s.json  # the CI preset (~15 s)

Theory of operation
-------------------
One process runs our server (``AsyncTLSListener`` over anyio TCP listeners on
127.0.0.1, ports 0) and our clients (``anyio.connect_tcp`` +
``AsyncTLSStream.wrap``) on one event loop, with one :class:`Offload` of two
workers.  Two server contexts: RSA-2048 with offload (the handshake's
signature runs on a worker) and P-256 with the test engine's record pauses
(reads, writes and shutdowns pause too); two client contexts: plain, and with
record pauses.  Each connection takes one of the four pairs at random.

A bounded number of client workers (``--concurrency``) run the connections one
after another.  Connection ``i`` sends a 24-byte header (id, bytes up, bytes
down), then streams its upload while it reads the server's download (full
duplex); the server answers with the blake2b digests of what it received and
what it sent, which the client compares with its own: every byte is checked
end to end.  Most connections carry a few KiB; every ``--bulk-every``-th
carries a share of ``--bytes``.  Both sides then close with close_notify.

Meanwhile a schedule keeps the engine failing (docs/architecture.md, rules 5
and 7): it refills EAGAIN, early and duplicate wake-up counts every tick (at
most one fault of each kind per 8 operations that reached a worker, so that
an operation retrying alone is never starved of progress), arms
one ERR every ``--err-every`` connections and turns late completions
(``late_ms``) on for short windows.  A count is refilled only once the engine
has used it up, so what was set is what was injected (ERR and EAGAIN are also
read back from ``Offload.stats()``).  An ERR fails one operation of one
connection: that side must raise :class:`AsyncEngineError` and its peer one
of the peer failures (``ssl.SSLError``, ``BrokenResourceError``,
``EndOfStream``), within ``--conn-timeout``.  Every failure must be explained:
the client's peer failures are at most the server's engine errors and the
other way round, and there are exactly as many engine errors as ERRs
injected.  Any other exception, a timeout (a hang) or a digest mismatch
fails the run.

Leaks.  RSS (``/proc/self/status`` VmRSS), the fd count (``/proc/self/fd``)
and the malloc heap in use (glibc's ``mallinfo2``: C allocations, OpenSSL's
included) are sampled every ~1% of the connections.  From the end of the
warm-up (``--warmup``, 20%) on, every ``--quiet-every`` (10%) of the
connections the run holds new connections back until everything in flight
has finished and the garbage is collected: a *quiet point*, where nothing
that lives for one connection is left.  A least-squares line through the
quiet points gives the slopes per 1000 handshakes (the slopes through every
sample are reported beside them).  The run fails when RSS grows faster than
``--max-rss-slope`` KiB, the heap faster than ``--max-heap-slope`` KiB or
fds faster than ``--max-fd-slope``, when a quiet point has more fds than the
first, when ``connection_counters()`` (live, paused_now, parked_now, leaked)
are not back to their values at the start, or when the offload still has jobs
in flight.

The heap bound, 32 KiB per 1000 handshakes, is half of what a leak of one
64-byte object per handshake adds; a healthy full run measured 0.5 and 2.3.
RSS also moves with fragmentation (glibc's arenas, Python's own): the quiet
points of a healthy run scatter by about 1 MiB, and their slopes measured
-8.5 to 24 KiB per 1000 handshakes over four 25,000-handshake phases, so its
bound is 64 KiB (one 64-byte object per handshake).  The heap tells a leak
from fragmentation: a leak of C memory grows both, fragmentation only RSS.
The short preset is too short to see a leak that small among the noise of a
few hundred handshakes (the first phase's job pool and caches still grow
during its first few hundred): it warms up for half its connections, checks
counters, fds and checksums exactly, and bounds the heap at 512 bytes and
RSS at 8 KiB per handshake (a TLS connection left behind is several KiB of
heap, and tens of KiB of RSS with its buffers).

``--backend both`` runs one phase per backend (asyncio, then trio) in the same
process and splits ``--handshakes`` and ``--bytes`` between them; each phase
has its own warm-up, quiet points and checks.  Every loop is bounded in count
and in time (``--seconds`` stops starting connections; each connection has
``--conn-timeout``).  Exit status 0 only when every check of every phase passed;
the JSON (``--out``) holds the figures, the samples and each check.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import random
import re
import ssl
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream
from anyio_asyncssl.testing import TestEngine

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

HEADER = struct.Struct("!QQQ")        # connection id, bytes up, bytes down
DIGEST = 32                           # blake2b digest size (trailer: 2 digests)
CHUNK_MAX = 64 * KIB
SMALL_MAX = 2 * KIB                   # a small connection carries up to this each way
PATTERN = random.Random(20240614).randbytes(MIB + CHUNK_MAX)   # payload source
# the failures a side may see when its peer's engine failed (and nothing else)
PEER_FAILURES: tuple[type[BaseException], ...] = (
    ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)


# -- the figures -------------------------------------------------------------------
def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0.0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def slope_after_warmup(samples: Sequence[dict[str, float]], key: str, warmup_x: float,
                       per: float = 1000.0) -> float:
    """The slope of ``key`` over ``handshakes`` for samples at or after ``warmup_x``,
    per ``per`` handshakes."""
    tail = [s for s in samples if s["handshakes"] >= warmup_x]
    return fit_slope([s["handshakes"] for s in tail], [s[key] for s in tail]) * per


def slope_check(samples: Sequence[dict[str, float]], key: str, warmup_x: float,
                bound: float) -> dict[str, Any]:
    """``{"ok", "slope", "bound", "samples"}``: whether ``key`` grows slower than ``bound``
    per 1000 handshakes after the warm-up (at least 5 samples needed to judge)."""
    used = sum(1 for s in samples if s["handshakes"] >= warmup_x)
    slope = slope_after_warmup(samples, key, warmup_x)
    return {"ok": used >= 5 and slope <= bound, "slope": round(slope, 3), "bound": bound,
            "samples": used}


def rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * KIB if m else 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):   # not glibc >= 2.33
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back, in every arena (glibc; else 0).

    Beside RSS it tells a leak (this grows) from fragmentation (only RSS does).
    """
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def parse_size(text: str) -> int:
    """``1GiB``, ``8MiB``, ``500KiB``, ``1000`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * {"": 1, "K": KIB, "M": MIB, "G": GIB}[unit])


# -- one phase's bookkeeping -------------------------------------------------------
@dataclass
class Tally:
    started: int = 0               # connections begun
    finished: int = 0              # connections over (either way)
    handshakes_ok: int = 0         # client side
    verified: int = 0              # connections whose digests matched
    bytes_verified: int = 0        # payload bytes (both directions) of those
    mismatches: int = 0
    server_ok: int = 0
    failures: dict[str, Counter[str]] = field(
        default_factory=lambda: {"client": Counter(), "server": Counter()})
    engine_errors: Counter[str] = field(default_factory=Counter)   # side -> AsyncEngineError
    peer_failures: Counter[str] = field(default_factory=Counter)   # side -> a peer failure
    unexpected: list[str] = field(default_factory=list)
    unexpected_count: int = 0
    examples: dict[str, str] = field(default_factory=dict)   # the first of each failure

    def failed(self, side: str, exc: BaseException, where: str) -> None:
        """Classify a failure of one side of a connection (see the module docstring)."""
        leaves = list(_leaves(exc))
        names = "+".join(sorted({type(e).__name__ for e in leaves}))
        key = f"{where}:{names}"
        self.failures[side][key] += 1
        self.examples.setdefault(f"{side} {key}", "; ".join(str(e)[:160] for e in leaves))
        if any(isinstance(e, A.AsyncEngineError) for e in leaves):
            self.engine_errors[side] += 1
        elif leaves and all(isinstance(e, PEER_FAILURES) for e in leaves):
            self.peer_failures[side] += 1
        else:
            self.unexpected_count += 1
            if len(self.unexpected) < 20:
                tb = traceback.extract_tb(leaves[-1].__traceback__ if leaves else None)
                last = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                  for f in reversed(tb[-4:]))
                self.unexpected.append(f"{side} {where}: {exc!r} at {last}")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@dataclass(frozen=True)
class ConnPlan:
    ident: int
    route: int      # bit 0: pausing server, bit 1: pausing client
    up: int
    down: int


def conn_plan(i: int, seed: int, bulk_every: int, bulk_size: int) -> ConnPlan:
    rng = random.Random(seed * 1_000_003 + i)
    route = rng.randrange(4)
    if bulk_every and i % bulk_every == bulk_every // 2:
        up = rng.randrange(bulk_size + 1)
        return ConnPlan(i, route, up, bulk_size - up)
    return ConnPlan(i, route, rng.randrange(SMALL_MAX + 1), rng.randrange(SMALL_MAX + 1))


def payload(ident: int, n: int) -> Iterator[bytes]:
    """``n`` bytes for connection ``ident``, in chunks of varied sizes."""
    offset = (ident * 7919) % MIB
    step = 4 * KIB + (ident * 104729) % (CHUNK_MAX - 4 * KIB)
    while n > 0:
        take = min(n, step)
        yield PATTERN[offset:offset + take]
        n -= take
        offset = (offset + take) % MIB


class Reader:
    """Exact-size reads from a stream (keeps what a receive brought beyond them)."""

    def __init__(self, stream: AsyncTLSStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += await self.stream.receive()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def hashed(self, n: int) -> bytes:
        """Read ``n`` bytes; return their digest (nothing kept)."""
        h = hashlib.blake2b(digest_size=DIGEST)
        take = min(n, len(self.buf))
        h.update(self.buf[:take])
        del self.buf[:take]
        n -= take
        while n > 0:
            data = await self.stream.receive(min(n, CHUNK_MAX))
            h.update(data)
            n -= len(data)
        return h.digest()


async def send_hashed(stream: AsyncTLSStream, ident: int, n: int, first: bytes = b"") -> bytes:
    """Send ``first`` then ``n`` payload bytes; return the payload's digest."""
    h = hashlib.blake2b(digest_size=DIGEST)
    for chunk in payload(ident, n):
        h.update(chunk)
        if first:
            chunk, first = first + chunk, b""
        await stream.send(chunk)
    if first:
        await stream.send(first)
    return h.digest()


# -- the fault schedule ------------------------------------------------------------
class FaultSchedule:
    """Keeps the engine failing; counts what it injected (module docstring)."""

    REFILL = {"eagain": 3, "early": 2, "duplicate": 2}   # scaled by --refill
    # a refill of n waits for n * OPS_PER_FAULT operations to reach a worker
    # since the last: refilled whenever used up, EAGAIN starved an operation
    # retrying alone (at a quiet point) until its connection timed out
    OPS_PER_FAULT = 8
    FIELD = {"eagain": "eagain_count", "early": "early_count",
             "duplicate": "duplicate_count", "err": "err_count"}

    def __init__(self, engine: TestEngine, offload: A.Offload, tally: Tally, *,
                 err_every: int, late_every: int, late_ms: int, late_window: float,
                 refill: float) -> None:
        self.engine = engine
        self.refill = {k: round(v * refill) for k, v in self.REFILL.items()}
        self.offload = offload
        self.tally = tally
        self.err_every = err_every
        self.late_every = late_every
        self.late_ms = late_ms
        self.late_window = late_window
        self.armed = dict.fromkeys(self.FIELD, 0)       # last count set, per kind
        self.injected = dict.fromkeys([*self.FIELD, "late_windows", "late_ops"], 0)
        self.next_err = err_every
        self.next_late = late_every
        self.late_until: float | None = None
        self.late_submitted = 0
        self.refilled_at = dict.fromkeys(self.refill, 0)   # ``submitted`` then

    def tick(self) -> None:
        remaining = self.engine.faults()
        submitted = self.offload.stats().submitted
        wanted: dict[str, int] = {}
        for kind, fieldname in self.FIELD.items():
            if remaining[fieldname] == 0 and self.armed[kind]:
                self.injected[kind] += self.armed[kind]   # used up: all of it was injected
                self.armed[kind] = 0
            if remaining[fieldname] == 0:
                if kind in self.refill:
                    n = self.refill[kind]
                    if n and submitted - self.refilled_at[kind] >= n * self.OPS_PER_FAULT:
                        wanted[kind] = n
                        self.refilled_at[kind] = submitted
                elif self.err_every and self.tally.started >= self.next_err:
                    wanted[kind] = 1
                    self.next_err += self.err_every
        for kind, n in wanted.items():
            self.armed[kind] = n
        if wanted:   # None: unchanged
            self.engine.set(eagain=wanted.get("eagain"), early=wanted.get("early"),
                            duplicate=wanted.get("duplicate"), err=wanted.get("err"))
        now = time.monotonic()
        if self.late_until is None and self.late_every and self.tally.started >= self.next_late:
            self.next_late += self.late_every
            self.late_until = now + self.late_window
            self.late_submitted = self.offload.stats().submitted
            self.engine.set(late_ms=self.late_ms)
            self.injected["late_windows"] += 1
        elif self.late_until is not None and now >= self.late_until:
            self.end_late_window()

    def end_late_window(self) -> None:
        if self.late_until is not None:
            self.engine.set(late_ms=0)
            self.injected["late_ops"] += self.offload.stats().submitted - self.late_submitted
            self.late_until = None

    def finish(self) -> dict[str, int]:
        """Stop injecting; the counts of what was injected."""
        self.end_late_window()
        remaining = self.engine.faults()
        for kind, fieldname in self.FIELD.items():
            self.injected[kind] += self.armed[kind] - remaining[fieldname]
            self.armed[kind] = 0
        self.engine.clear()
        return dict(self.injected)


# -- the phase ----------------------------------------------------------------------
@dataclass
class Setup:
    offload: A.Offload
    engine: TestEngine
    server_contexts: tuple[A.TLSContext, A.TLSContext]   # plain (RSA), pausing (P-256)
    client_contexts: tuple[A.TLSContext, A.TLSContext]   # plain, pausing


class SoakListener(AsyncTLSListener):
    """Counts handshake failures instead of logging them."""

    tally: Tally

    async def handle_handshake_error(  # type: ignore[override]
            self, exc: BaseException, stream: Any) -> None:
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        self.tally.failed("server", exc, "handshake")


class Phase:
    def __init__(self, setup: Setup, args: argparse.Namespace, backend: str,
                 handshakes: int, total_bytes: int) -> None:
        self.setup = setup
        self.args = args
        self.backend = backend
        self.handshakes = handshakes
        self.tally = Tally()
        self.samples: list[dict[str, float]] = []
        self.quiet: list[dict[str, float]] = []   # the quiet points (module docstring)
        self.warm_n = int(handshakes * args.warmup)
        # connections start only below the gate; at each gate, a quiet point
        step = max(1, int(handshakes * args.quiet_every))
        self.gates = [*range(self.warm_n, handshakes, step)] or [handshakes]
        self.gate = self.gates[0]
        self.gate_open = anyio.Event()
        self.sample_every = max(1, handshakes // args.samples)
        small = (SMALL_MAX + 1) * handshakes      # expected small traffic, both ways
        n_bulk = handshakes // args.bulk_every if args.bulk_every else 0
        self.bulk_size = max(0, (total_bytes - small) // n_bulk) if n_bulk else 0
        self.next_index = 0
        self.in_flight = 0
        self.ports: list[int] = []
        self.stopped_early = False
        self.t0 = 0.0
        self.deadline = 0.0
        self.counters0: dict[str, int] = {}
        self.after_close: dict[str, float] = {}
        self.kept: list[bytearray] = []   # --inject-leak: what each connection leaks

    def sample(self, collect: bool = False) -> dict[str, float]:
        if collect:   # a full collection takes ~50 ms here: at quiet points only
            gc.collect()
        return {"handshakes": self.tally.finished, "rss": rss_bytes(), "fds": fd_count(),
                "heap": heap_in_use(),
                "t": round(time.monotonic() - self.t0, 3), "in_flight": self.in_flight}

    async def settle(self, baseline: dict[str, int] | None, timeout: float = 15.0) -> bool:
        """Wait (bounded) until nothing is in flight and the counters are back."""
        end = time.monotonic() + timeout
        while True:
            gc.collect()
            A.reap_parked()
            now = A.connection_counters()
            quiet = self.in_flight == 0 and self.setup.offload.stats().in_flight == 0 and (
                baseline is None or all(now[k] <= baseline[k]
                                        for k in ("live", "paused_now", "parked_now")))
            if quiet or time.monotonic() > end:
                return quiet
            await anyio.sleep(0.02)

    # -- the two sides --------------------------------------------------------------
    async def serve_one(self, stream: AsyncTLSStream) -> None:
        tally = self.tally
        try:
            with anyio.fail_after(self.args.conn_timeout):
                reader = Reader(stream)
                ident, up, down = HEADER.unpack(await reader.exactly(HEADER.size))
                digests: dict[str, bytes] = {}

                async def upload() -> None:
                    digests["up"] = await reader.hashed(up)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(upload)
                    digests["down"] = await send_hashed(stream, ident, down)
                await stream.send(digests["up"] + digests["down"])
                await stream.aclose()
            tally.server_ok += 1
        except Exception as exc:
            tally.failed("server", exc, "stream")
            await anyio.aclose_forcefully(stream)

    async def client_one(self, plan: ConnPlan) -> None:
        tally = self.tally
        if self.args.inject_leak:
            self.kept.append(bytearray(b"\1" * self.args.inject_leak))
        port = self.ports[plan.route & 1]
        context = self.setup.client_contexts[plan.route >> 1]
        where = "connect"
        try:
            with anyio.fail_after(self.args.conn_timeout):
                tcp = await anyio.connect_tcp("127.0.0.1", port)
                where = "handshake"
                try:
                    stream = await AsyncTLSStream.wrap(tcp, context=context,
                                                       hostname="localhost")
                except BaseException:
                    await anyio.aclose_forcefully(tcp)
                    raise
                tally.handshakes_ok += 1
                where = "stream"
                try:
                    reader = Reader(stream)
                    digests: dict[str, bytes] = {}

                    async def upload() -> None:
                        digests["up"] = await send_hashed(
                            stream, plan.ident, plan.up,
                            HEADER.pack(plan.ident, plan.up, plan.down))

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(upload)
                        digests["down"] = await reader.hashed(plan.down)
                    trailer = await reader.exactly(2 * DIGEST)
                    where = "close"
                    await stream.aclose()
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
            if trailer == digests["up"] + digests["down"]:
                tally.verified += 1
                tally.bytes_verified += plan.up + plan.down
            else:
                tally.mismatches += 1
                if len(tally.unexpected) < 20:
                    tally.unexpected.append(f"connection {plan.ident}: digests differ")
        except Exception as exc:
            tally.failed("client", exc, where)

    async def worker(self) -> None:
        a = self.args
        while self.next_index < self.handshakes:
            if time.monotonic() > self.deadline:
                self.stopped_early = True
                return
            i = self.next_index
            self.next_index += 1
            while i >= self.gate:                  # wait for the quiet point
                await self.gate_open.wait()
            self.tally.started += 1
            self.in_flight += 1
            try:
                await self.client_one(conn_plan(i, a.seed, a.bulk_every, self.bulk_size))
            finally:
                self.in_flight -= 1
                self.tally.finished += 1
            if self.tally.finished % self.sample_every == 0:
                self.samples.append(self.sample())

    async def quiet_points(self, schedule: FaultSchedule) -> None:
        """Hold new connections at each gate until everything in flight is over; sample."""
        for gate in self.gates:
            while self.tally.finished < gate and not (self.stopped_early and not self.in_flight):
                await anyio.sleep(0.01)
            schedule.end_late_window()
            settled = await self.settle(self.counters0)
            point = self.sample(collect=True)
            point["settled"] = settled
            point["live"] = A.connection_counters()["live"]
            self.quiet.append(point)
            opened, self.gate_open = self.gate_open, anyio.Event()
            later = [g for g in self.gates if g > gate]
            self.gate = later[0] if later else self.handshakes
            opened.set()

    async def run(self) -> dict[str, Any]:
        setup, a = self.setup, self.args
        off = setup.offload
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.seconds
        self.counters0 = counters0 = A.connection_counters()
        stats0 = off.stats()
        start = self.sample(collect=True)
        schedule = FaultSchedule(setup.engine, off, self.tally, err_every=a.err_every,
                                 late_every=a.late_every, late_ms=a.late_ms,
                                 late_window=a.late_window, refill=a.refill)
        listeners = []
        async with anyio.create_task_group() as servers:
            for ctx in setup.server_contexts:
                tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
                listeners.append(tcp)
                self.ports.append(tcp.extra(SocketAttribute.local_port))
                listener = SoakListener(tcp, ctx, handshake_timeout=a.conn_timeout)
                listener.tally = self.tally
                servers.start_soon(listener.serve, self.serve_one)
            async with anyio.create_task_group() as clients:

                async def faults() -> None:
                    while True:
                        schedule.tick()
                        await anyio.sleep(a.tick)

                clients.start_soon(faults)
                async with anyio.create_task_group() as workers:
                    workers.start_soon(self.quiet_points, schedule)
                    for _ in range(a.concurrency):
                        workers.start_soon(self.worker)
                clients.cancel_scope.cancel()
            injected = schedule.finish()
            settled = await self.settle(counters0)
            # the end's quiet point, with the listeners still open as after the warm-up
            end = self.sample(collect=True)
            end["settled"] = settled
            end["live"] = A.connection_counters()["live"]
            self.quiet.append(end)
            counters1 = A.connection_counters()
            stats1 = off.stats()
            servers.cancel_scope.cancel()
        for tcp in listeners:
            await tcp.aclose()
        self.after_close = self.sample(collect=True)
        return self.report(start, end, counters0, counters1, stats0, stats1, injected, settled)

    def report(self, start: dict[str, float], end: dict[str, float],
               counters0: dict[str, int], counters1: dict[str, int],
               stats0: A.OffloadStats, stats1: A.OffloadStats,
               injected: dict[str, int], settled: bool) -> dict[str, Any]:
        t, a = self.tally, self.args
        delta = {k: getattr(stats1, k) - getattr(stats0, k) for k in (
            "submitted", "completed", "pauses", "spurious_resumes", "queue_full", "errors",
            "notify_callback", "notify_fd", "sign_ops", "decrypt_ops", "cipher_ops", "inline")}
        warm = self.quiet[0]
        engine_errors = t.engine_errors["client"] + t.engine_errors["server"]
        checks: dict[str, dict[str, Any]] = {
            "no_unexpected_exceptions": {"ok": t.unexpected_count == 0,
                                         "count": t.unexpected_count, "first": t.unexpected},
            "checksums_match": {"ok": t.mismatches == 0, "mismatches": t.mismatches},
            "every_connection_accounted": {
                "ok": t.finished == t.started and t.finished == t.verified + t.mismatches + sum(
                    t.failures["client"].values()),
                "started": t.started, "finished": t.finished},
            "client_peer_failures_explained": {
                "ok": t.peer_failures["client"] <= t.engine_errors["server"],
                "client_peer_failures": t.peer_failures["client"],
                "server_engine_errors": t.engine_errors["server"]},
            "server_peer_failures_explained": {
                "ok": t.peer_failures["server"] <= t.engine_errors["client"],
                "server_peer_failures": t.peer_failures["server"],
                "client_engine_errors": t.engine_errors["client"]},
            # every ERR fails its side with AsyncEngineError; the offload counts
            # the ERRs plus the peers' real decrypt failures: after a failed
            # encryption OpenSSL sends its alert under the next sequence number
            # (bad_record_mac), which the peer decrypts on a worker if it pauses
            "engine_errors_injected": {
                "ok": engine_errors == injected["err"]
                and injected["err"] <= delta["errors"] <= 2 * injected["err"],
                "engine_errors": engine_errors, "err_injected": injected["err"],
                "offload_errors": delta["errors"]},
            "offload_idle": {"ok": stats1.in_flight == 0, "in_flight": stats1.in_flight},
            "connection_counters_back": {
                "ok": settled and all(counters1[k] == counters0[k]
                                      for k in ("live", "paused_now", "parked_now", "leaked")),
                "start": counters0, "end": counters1},
            "fds_flat_at_quiet_points": {
                "ok": all(q["fds"] <= warm["fds"] for q in self.quiet),
                "fds": [q["fds"] for q in self.quiet]},
            # judged at the quiet points (nothing in flight, garbage collected);
            # the slopes through every sample are reported beside them
            "rss_slope": slope_check(self.quiet, "rss", self.warm_n, a.max_rss_slope * KIB),
            "heap_slope": slope_check(self.quiet, "heap", self.warm_n, a.max_heap_slope * KIB),
            "fd_slope": slope_check(self.quiet, "fds", self.warm_n, a.max_fd_slope),
            "enough_done": {"ok": t.finished >= a.min_done * self.handshakes,
                            "finished": t.finished, "planned": self.handshakes,
                            "stopped_early": self.stopped_early},
        }
        checks["rss_slope"]["slope_kib_per_1000"] = round(checks["rss_slope"]["slope"] / KIB, 3)
        every_rss = slope_after_warmup(self.samples, "rss", self.warm_n) / KIB
        every_fds = slope_after_warmup(self.samples, "fds", self.warm_n)
        heap_slope = checks["heap_slope"]["slope"] / KIB
        seconds = time.monotonic() - self.t0
        return {
            "backend": self.backend,
            "ok": all(c["ok"] for c in checks.values()),
            "seconds": round(seconds, 2),
            "handshakes": {"planned": self.handshakes, "started": t.started,
                           "client_ok": t.handshakes_ok, "server_streams_ok": t.server_ok,
                           "verified": t.verified, "per_s": round(t.finished / seconds, 1)},
            "bytes": {"verified": t.bytes_verified, "bulk_size": self.bulk_size,
                      "mib_per_s": round(t.bytes_verified / MIB / seconds, 2)},
            "faults_injected": injected,
            "failures": {side: dict(c) for side, c in t.failures.items()},
            "failure_examples": t.examples,
            "offload": delta,
            "rss": {"start": start["rss"], "after_warmup": warm["rss"], "end": end["rss"],
                    "slope_kib_per_1000_handshakes": checks["rss_slope"]["slope_kib_per_1000"],
                    "slope_every_sample": round(every_rss, 3)},
            "heap_in_use": {"start": start["heap"], "after_warmup": warm["heap"],
                            "end": end["heap"],
                            "slope_kib_per_1000_handshakes": round(heap_slope, 3)},
            "fds": {"start": start["fds"], "after_warmup": warm["fds"], "end": end["fds"],
                    "slope_per_1000_handshakes": checks["fd_slope"]["slope"],
                    "slope_every_sample": round(every_fds, 3)},
            "counters": {"start": counters0, "end": counters1},
            "checks": checks,
            "quiet_points": self.quiet,
            "after_listeners_closed": self.after_close,
            "samples": self.samples,
        }


# -- setting up ---------------------------------------------------------------------
def make_setup(tmp: Path) -> Setup:
    offload = A.Offload(workers=2, priority="normal")
    engine = TestEngine(offload)
    engine.set_record_pauses(True)
    rsa_cert, rsa_key = A.generate_self_signed("localhost", key_type="rsa", bits=2048)
    ec_cert, ec_key = A.generate_self_signed("localhost", key_type="ec")
    (tmp / "rsa.pem").write_bytes(rsa_key + rsa_cert)
    (tmp / "ec.pem").write_bytes(ec_key + ec_cert)
    plain_server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    plain_server.load_cert_chain(tmp / "rsa.pem")
    pausing_server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    pausing_server.load_cert_chain(tmp / "ec.pem")
    engine.enable_record_pauses(pausing_server)
    trust = (rsa_cert + ec_cert).decode("ascii")
    plain_client = A.create_default_context(cadata=trust)
    pausing_client = A.create_default_context(cadata=trust, offload=offload)
    engine.enable_record_pauses(pausing_client)
    return Setup(offload, engine, (plain_server, pausing_server), (plain_client, pausing_client))


# The short run fits its slopes to 6 quiet points over 250 handshakes per phase:
# one allocator arena or container resize in that window reads as hundreds of
# bytes per handshake (616 B once, on bookworm's trio phase), so its bounds
# catch only a leak per connection: 4 KiB of heap, 8 KiB of RSS per handshake,
# where one leaked SSL object with its buffers is tens of KiB.  The full run
# (5,000+ handshakes per point) holds the 32/64 KiB per 1,000 bounds.
SHORT = {"handshakes": 1000, "bytes": 4 * MIB, "concurrency": 32, "bulk_every": 25,
         "err_every": 60, "late_every": 250, "warmup": 0.5, "max_rss_slope": 8192.0,
         "max_heap_slope": 4096.0,
         "seconds": 120.0}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true",
                   help="the CI preset: " + ", ".join(f"{k}={v}" for k, v in SHORT.items()))
    p.add_argument("--handshakes", type=int, default=50_000, help="connections, in all")
    p.add_argument("--bytes", type=parse_size, default=GIB, help="payload in all (1GiB, 8MiB)")
    p.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    p.add_argument("--seconds", type=float, default=3600.0,
                   help="stop starting connections after this long (per phase)")
    p.add_argument("--concurrency", type=int, default=48, help="connections in flight")
    p.add_argument("--bulk-every", type=int, default=50,
                   help="every Nth connection carries a share of --bytes")
    p.add_argument("--err-every", type=int, default=200, help="one engine ERR per N connections")
    p.add_argument("--late-every", type=int, default=2000,
                   help="a late-completion window every N connections")
    p.add_argument("--late-ms", type=int, default=150)
    p.add_argument("--late-window", type=float, default=0.3, help="seconds")
    p.add_argument("--refill", type=float, default=1.0,
                   help="scale the EAGAIN/early/duplicate counts set each tick (0: none)")
    p.add_argument("--tick", type=float, default=0.02, help="fault refill period, seconds")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction before the slope fit")
    p.add_argument("--quiet-every", type=float, default=0.1,
                   help="a quiet point every this fraction of the connections, after the warm-up")
    p.add_argument("--samples", type=int, default=100, help="RSS/fd samples per phase")
    p.add_argument("--max-rss-slope", type=float, default=64.0,
                   help="KiB per 1000 handshakes after the warm-up")
    p.add_argument("--max-heap-slope", type=float, default=32.0,
                   help="KiB of malloc heap in use per 1000 handshakes after the warm-up")
    p.add_argument("--max-fd-slope", type=float, default=0.5,
                   help="fds per 1000 handshakes after the warm-up")
    p.add_argument("--min-done", type=float, default=0.0,
                   help="fail if fewer than this fraction of connections ran (--seconds)")
    p.add_argument("--conn-timeout", type=float, default=60.0,
                   help="seconds one connection may take (a hang fails the run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--inject-leak", type=int, default=0, metavar="BYTES",
                   help="keep BYTES of heap per connection (the test that the checks fail)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.short:
        given = set(sys.argv[1:] if argv is None else argv)
        for key, value in SHORT.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    rss0, fds0 = rss_bytes(), fd_count()
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = make_setup(Path(tmp))
        for n, backend in enumerate(backends):
            share = len(backends) - n
            handshakes = (args.handshakes - sum(p["handshakes"]["planned"] for p in phases))
            total = args.bytes - sum(p["bytes"]["planned"] for p in phases)
            phase = Phase(setup, args, backend, handshakes // share, total // share)
            result: dict[str, Any] = anyio.run(phase.run, backend=backend)
            result["bytes"]["planned"] = total // share
            phases.append(result)
            print(summary(result), flush=True)
        setup.offload.close()
    report = {
        "ok": all(p["ok"] for p in phases),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "openssl": A.OPENSSL_VERSION, "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)),
        "process": {"rss_before_setup": rss0, "fds_before_setup": fds0},
        "handshakes": sum(p["handshakes"]["started"] for p in phases),
        "bytes": sum(p["bytes"]["verified"] for p in phases),
        "seconds": round(sum(p["seconds"] for p in phases), 2),
        "phases": phases,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print("soak: " + ("ok" if report["ok"] else "FAILED"), flush=True)
    return 0 if report["ok"] else 1


def summary(r: dict[str, Any]) -> str:
    failed = [name for name, c in r["checks"].items() if not c["ok"]]
    hs, rss, fds = r["handshakes"], r["rss"], r["fds"]
    return (f"{r['backend']}: {hs['started']} handshakes ({hs['verified']} verified) "
            f"{r['bytes']['verified'] / MIB:.1f} MiB in {r['seconds']:.1f} s; "
            f"faults {r['faults_injected']}; RSS {rss['start'] / MIB:.1f}/"
            f"{rss['after_warmup'] / MIB:.1f}/{rss['end'] / MIB:.1f} MiB, slope "
            f"{rss['slope_kib_per_1000_handshakes']} KiB/1000; fds {fds['start']}/"
            f"{fds['after_warmup']}/{fds['end']}, slope {fds['slope_per_1000_handshakes']}/1000; "
            + ("ok" if not failed else f"FAILED: {', '.join(failed)}"))


if __name__ == "__main__":
    sys.exit(main())
