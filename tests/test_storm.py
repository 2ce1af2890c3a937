"""Cancellation storm: thousands of connections cancelled at random points, nothing lost or leaked.

Theory of operation
-------------------
Each face (the anyio stream on asyncio and on trio, the asyncio transport
layer) runs ``STORM`` connections over loopback TCP, ``CONCURRENCY`` at a
time.  For each, a seeded generator draws the *victim* side (server or
client), the operation to cancel (handshake, read, write, shutdown), whether
the connection runs paused by the test engine (offloaded handshake and
record-cipher pauses, with latency) or unpaused (no offload, the native
path), and the *trigger*: a number of scheduling points after the operation
started, or (paused connections) after its job paused.  A watcher task then
cancels the operation's scope and records whether a job was paused at that
instant (``TLSConnection.pending_operation``).

Both sides send a slice of one random pool in random chunks and read the
other's.  A byte of the pool at a given offset identifies its position, so a
received stream that is not exactly a prefix of the sent slice (a loss in
the middle, a duplicated or reordered record) fails; its BLAKE2b is compared
with the sent slice's.  What each cancellation may do, in the vocabulary the
faces document:

* a cancelled **handshake** leaves nothing usable: the victim closes, the
  peer ends with a clean error (or, if its side finished, sees the close);
* a cancelled **read** loses nothing: the victim reads on and gets every byte;
* a cancelled **write** may have sent a prefix of its chunk (anyio) or all
  of it (the asyncio layer buffers it): the victim stops writing and closes,
  and the peer's bytes are the completed chunks plus at most that one;
* a cancelled **shutdown** still closes the transport.

Afterwards the counters must be back where they started: live SSL objects,
paused jobs, parked connections, offload jobs in flight, the dispatcher's
registered waiters and job waiters, and the process's open fds.  Every
connection is bounded in time (``fail_after``); the figures (cancellations
by kind, those that landed on a paused job, bytes checksummed) are printed
and written to ``$ASYNCSSL_STORM_REPORT`` when set (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import json
import os
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl import asyncio as AA
from anyio_asyncssl import asyncio_tls
from anyio_asyncssl import stream as stream_module
from anyio_asyncssl.dispatch import current_dispatcher
from anyio_asyncssl.stream import AsyncTLSStream
from anyio_asyncssl.testing import TestEngine

STORM = int(os.environ.get("ASYNCSSL_STORM", "2000"))
SEED = int(os.environ.get("ASYNCSSL_STORM_SEED", "20261130"))
CONCURRENCY = 24
BIG_WRITE = 300_000             # an unpaused write long enough to wait for the socket
PER_CONNECTION = 30.0           # seconds: a connection that takes longer is a hang
POOL = random.Random(SEED).randbytes(1 << 20)
OPS = ("handshake", "read", "write", "shutdown")
CLEAN = (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream,
         anyio.ClosedResourceError, ConnectionError)


# -- finding the connection a face makes, before its handshake -----------------------
_made: contextvars.ContextVar[list[A.TLSConnection] | None] = contextvars.ContextVar(
    "_made", default=None)


class _Published(A.TLSConnection):
    """A TLSConnection that appends itself to the creating task's ``_made`` list."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        made = _made.get()
        if made is not None:
            made.append(self)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "TLSConnection", _Published)
    monkeypatch.setattr(asyncio_tls, "TLSConnection", _Published)


# -- the plan --------------------------------------------------------------------------
@dataclass
class Plan:
    index: int
    victim: str            # "server" | "client"
    op: str                # one of OPS
    paused: bool           # the test engine pauses this connection's crypto
    after_pause: bool      # trigger counts from the job's first pause
    trigger: int           # scheduling points before the cancel (-1: cancelled before it starts)
    sizes: dict[str, list[int]]    # side -> its chunk sizes
    offsets: dict[str, int]        # side -> where its bytes start in POOL
    cancel_at_chunk: int           # which read/write of the victim is cancelled

    def data(self, side: str) -> bytes:
        off = self.offsets[side]
        return POOL[off:off + sum(self.sizes[side])]


def plan(index: int, rng: random.Random) -> Plan:
    sizes = {side: [rng.choice((1, 100, 1500, 4096, 16384, 16385, 40000))
                    for _ in range(rng.randrange(1, 6))] for side in ("server", "client")}
    victim, op, paused = rng.choice(("server", "client")), rng.choice(OPS), rng.random() < 0.5
    cancel_at = rng.randrange(0, 3)
    if op == "write":
        cancel_at = min(cancel_at, len(sizes[victim]) - 1)
        if not paused:   # unpaused, a write waits only when the socket buffer is full
            sizes[victim][cancel_at] = BIG_WRITE
    offsets = {side: rng.randrange(0, len(POOL) - sum(s)) for side, s in sizes.items()}
    return Plan(index, victim, op, paused, paused and rng.random() < 0.7,
                rng.randrange(-1, 8), sizes, offsets, cancel_at)


@dataclass
class Tally:
    cancelled: Counter[str] = field(default_factory=Counter)      # op/paused -> landed
    landed_paused: Counter[str] = field(default_factory=Counter)  # op -> a job was paused
    completed_first: Counter[str] = field(default_factory=Counter)  # trigger came too late
    peer_errors: Counter[str] = field(default_factory=Counter)
    bytes_checked: int = 0
    connections: int = 0
    slowest: float = 0.0            # seconds, the slowest connection

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "cancelled": dict(self.cancelled),
                "cancelled_total": sum(self.cancelled.values()),
                "landed_on_a_paused_job": dict(self.landed_paused),
                "landed_on_a_paused_job_total": sum(self.landed_paused.values()),
                "operation_finished_first": dict(self.completed_first),
                "peer_errors": dict(self.peer_errors), "bytes_checksummed": self.bytes_checked,
                "slowest_connection_seconds": round(self.slowest, 2)}


def clean_error(exc: BaseException) -> str | None:
    """The name of a clean error (or a group of only clean errors), else None."""
    if isinstance(exc, BaseExceptionGroup):
        names = {clean_error(e) for e in exc.exceptions}
        return None if None in names else "+".join(sorted(n for n in names if n))
    return type(exc).__name__ if isinstance(exc, CLEAN) else None


def check_prefix(got: bytes, sent: bytes, *, at_least: int, what: str) -> int:
    """``got`` is exactly a prefix of ``sent`` of at least ``at_least`` bytes; BLAKE2b-checked."""
    assert len(got) <= len(sent), f"{what}: {len(got) - len(sent)} bytes more than sent"
    assert hashlib.blake2b(got).digest() == hashlib.blake2b(sent[:len(got)]).digest(), (
        f"{what}: the bytes are not a prefix of what was sent (lost or duplicated)")
    assert len(got) >= at_least, f"{what}: {at_least - len(got)} sent bytes never arrived"
    return len(got)


class Cancel:
    """Cancels a scope at a plan's trigger; records whether a job was paused then."""

    def __init__(self, plan: Plan, made: list[A.TLSConnection]) -> None:
        self.plan = plan
        self.made = made
        self.scope = anyio.CancelScope()
        self.was_paused: bool | None = None
        self.fired = False

    def conn(self) -> A.TLSConnection | None:
        return self.made[-1] if self.made else None

    def paused_now(self) -> bool:
        c = self.conn()
        try:
            return c is not None and c.pending_operation is not None
        except A.ConnectionFreedError:
            return False

    def arm(self, tg: anyio.abc.TaskGroup) -> None:
        """Before the operation: cancel now (trigger -1) or start the watcher."""
        if self.plan.trigger < 0:
            self.was_paused = self.paused_now()
            self.fired = True
            self.scope.cancel()
        else:
            tg.start_soon(self.watch)

    async def watch(self) -> None:
        if self.plan.after_pause:
            for _ in range(20_000):           # bounded: the operation may end unpaused
                if self.paused_now() or self.scope.cancel_called:
                    break
                await anyio.sleep(0)
        for _ in range(self.plan.trigger):
            await anyio.sleep(0)
        self.was_paused = self.paused_now()
        self.fired = True
        self.scope.cancel()


# -- the anyio face ----------------------------------------------------------------------
@dataclass
class Contexts:
    server: dict[bool, A.TLSContext]
    client: dict[bool, A.TLSContext]
    offload: A.Offload


@pytest.fixture
def contexts(pki: Pki) -> Iterator[Contexts]:
    off = A.Offload(workers=4)
    eng = TestEngine(off)
    plain_s = pki.server_ctx("ec")
    paused_s = pki.server_ctx("ec", offload=off)
    eng.enable_record_pauses(paused_s)
    plain_c = pki.client_ctx()
    paused_c = pki.client_ctx(offload=off)
    eng.enable_record_pauses(paused_c)
    eng.set_record_pauses(True)
    eng.set(latency_ms=0.2)
    try:
        yield Contexts({False: plain_s, True: paused_s}, {False: plain_c, True: paused_c}, off)
    finally:
        eng.clear()
        off.close()


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return server, client


async def anyio_side(side: str, p: Plan, sock: socket.socket, ctx: A.TLSContext,
                     got: dict[str, bytes], outcome: dict[str, str],
                     completed: dict[str, int], tally: Tally) -> None:
    victim = p.victim == side
    other = "client" if side == "server" else "server"
    made: list[A.TLSConnection] = []
    _made.set(made)
    transport = await anyio.abc.SocketStream.from_socket(sock)
    cancel = Cancel(p, made)
    received = bytearray()
    completed[side] = 0
    kind = f"{p.op}/{'paused' if p.paused else 'unpaused'}"

    def landed(op_finished: bool) -> None:
        if not cancel.fired:
            return
        if op_finished:
            tally.completed_first[kind] += 1
        else:
            tally.cancelled[kind] += 1
            if cancel.was_paused:
                tally.landed_paused[p.op] += 1

    stream: AsyncTLSStream | None = None
    try:
        # the handshake
        async with anyio.create_task_group() as tg:
            if victim and p.op == "handshake":
                cancel.arm(tg)
            with cancel.scope:
                stream = await AsyncTLSStream.wrap(
                    transport, server_side=side == "server", ssl_context=ctx,
                    hostname=None if side == "server" else "localhost")
            cancel.scope.cancel()   # the watcher, if it has not fired
        if stream is None:
            landed(False)
            outcome[side] = "handshake cancelled"
            await anyio.aclose_forcefully(transport)
            return
        if victim and p.op == "handshake":
            landed(True)
        cancel = Cancel(p, made)
        mine = p.data(side)
        expect = len(p.data(other))

        async def writer() -> None:
            assert stream is not None
            pos = 0
            for i, n in enumerate(p.sizes[side]):
                chunk = mine[pos:pos + n]
                if victim and p.op == "write" and i == p.cancel_at_chunk:
                    async with anyio.create_task_group() as tg2:
                        cancel.arm(tg2)
                        with cancel.scope:
                            await stream.send(chunk)
                            completed[side] += n
                        cancel.scope.cancel()
                    if cancel.scope.cancelled_caught:
                        landed(False)
                        # sent or not, the application cannot know: it stops
                        # writing (and reads on, so its close loses nothing)
                        return
                    landed(True)
                else:
                    await stream.send(chunk)
                    completed[side] += n
                pos += n

        async def reader() -> None:
            assert stream is not None
            reads = 0
            while len(received) < expect:
                if victim and p.op == "read" and reads == p.cancel_at_chunk and not cancel.fired:
                    async with anyio.create_task_group() as tg2:
                        cancel.arm(tg2)
                        with cancel.scope:
                            received.extend(await stream.receive())
                        cancel.scope.cancel()
                    landed(not cancel.scope.cancelled_caught)
                else:
                    received.extend(await stream.receive())
                reads += 1

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                tg.start_soon(reader)
        except BaseException as exc:
            name = clean_error(exc)
            if name is None:
                raise
            outcome[side] = f"data: {name}"
        else:
            outcome.setdefault(side, "data done")
        got[side] = bytes(received)
        # closing
        if victim and p.op == "shutdown":
            async with anyio.create_task_group() as tg:
                cancel.arm(tg)
                with cancel.scope:
                    await stream.aclose()
                cancel.scope.cancel()
            landed(not cancel.scope.cancelled_caught)
            await stream.aclose()   # idempotent: a cancelled close has closed
        else:
            with anyio.move_on_after(5):   # bounded: the peer may be gone
                try:
                    await stream.aclose()
                except CLEAN:
                    pass
            await anyio.aclose_forcefully(stream)
    except BaseException as exc:
        name = clean_error(exc)
        if name is None:
            raise
        outcome.setdefault(side, name)
        tally.peer_errors[name] += 1
        got.setdefault(side, bytes(received))
        await anyio.aclose_forcefully(stream if stream is not None else transport)
    assert sock.fileno() == -1, f"connection {p.index} {side}: the transport was left open"


def verify(p: Plan, got: dict[str, bytes], completed: dict[str, int], outcome: dict[str, str],
           tally: Tally) -> None:
    what = f"connection {p.index} (seed {SEED}) {p}: outcomes {outcome}"
    for side in ("server", "client"):
        other = "client" if side == "server" else "server"
        sent = p.data(other)
        received = got.get(side, b"")
        if p.op == "handshake" and p.victim in outcome and "handshake" in outcome.get(p.victim, ""):
            # nothing was exchanged
            assert received == b"" or check_prefix(received, sent, at_least=0, what=what) >= 0
            continue
        if p.op == "write" and p.victim == other:
            tally.bytes_checked += check_prefix(received, sent, at_least=completed.get(other, 0),
                                                what=what)
            continue
        if outcome.get(side, "").startswith("data done") and outcome.get(other, "").startswith(
                "data done"):
            assert len(received) == len(sent), what
        tally.bytes_checked += check_prefix(received, sent, at_least=0, what=what)


def counters() -> dict[str, int]:
    gc.collect()
    deadline = time.monotonic() + 10
    while A.connection_counters()["parked_now"] and time.monotonic() < deadline:
        A.reap_parked()
        time.sleep(0.001)
    c = A.connection_counters()
    return {k: c[k] for k in ("live", "paused_now", "parked_now", "leaked")}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def report(name: str, tally: Tally, seconds: float) -> None:
    figures = {"face": name, "seed": SEED, "seconds": round(seconds, 1), **tally.as_dict()}
    print(json.dumps(figures))
    out = os.environ.get("ASYNCSSL_STORM_REPORT")
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(figures) + "\n")


async def settle_dispatcher() -> dict[str, int]:
    d = current_dispatcher()
    for _ in range(200):
        if not d.waiters and not d.job_waiters:
            break
        await anyio.sleep(0.01)
    return {"waiters": len(d.waiters), "job_waiters": len(d.job_waiters)}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancellation_storm_anyio(backend: str, contexts: Contexts, published: None) -> None:
    """The anyio face, on both backends: every cancellation ends clean, nothing leaks."""
    rng = random.Random(f"{SEED}/{backend}")
    plans = [plan(i, rng) for i in range(STORM)]
    if os.environ.get("STORM_ONLY"):
        plans = [plans[int(os.environ["STORM_ONLY"])]]
    tally = Tally()
    listener = socket.create_server(("127.0.0.1", 0), backlog=CONCURRENCY * 2)

    async def run_one(p: Plan, limit: anyio.CapacityLimiter) -> None:
        async with limit:
            server, client = tcp_pair(listener)
            got: dict[str, bytes] = {}
            outcome: dict[str, str] = {}
            completed: dict[str, int] = {}
            t = time.monotonic()
            with anyio.fail_after(PER_CONNECTION):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(anyio_side, "server", p, server, contexts.server[p.paused],
                                  got, outcome, completed, tally)
                    tg.start_soon(anyio_side, "client", p, client, contexts.client[p.paused],
                                  got, outcome, completed, tally)
            verify(p, got, completed, outcome, tally)
            tally.connections += 1
            tally.slowest = max(tally.slowest, time.monotonic() - t)

    async def main() -> tuple[dict[str, int], int]:
        # warm up: the dispatcher (its notifier's eventfd) and the job pool exist
        await run_one(plan(-1, random.Random(0)), anyio.CapacityLimiter(1))
        tally.__dict__.update(Tally().__dict__)
        fds = open_fds()
        limit = anyio.CapacityLimiter(CONCURRENCY)
        async with anyio.create_task_group() as tg:
            for p in plans:
                tg.start_soon(run_one, p, limit)
        gc.collect()
        waiters = await settle_dispatcher()
        for _ in range(100):   # closed sockets are closed now; give parked jobs a turn
            if open_fds() <= fds:
                break
            await anyio.sleep(0.01)
        return waiters, open_fds() - fds

    before = counters()
    t0 = time.monotonic()
    try:
        waiters, fd_growth = anyio.run(main, backend=backend)
    finally:
        listener.close()
    after = counters()
    report(f"anyio/{backend}", tally, time.monotonic() - t0)
    assert after == before
    assert waiters == {"waiters": 0, "job_waiters": 0}
    assert fd_growth <= 0
    assert contexts.offload.stats().in_flight == 0
    assert tally.connections == STORM
    assert sum(tally.cancelled.values()) >= STORM // 3, tally.as_dict()
    for op in OPS:
        assert tally.cancelled[f"{op}/paused"] > 0, tally.as_dict()
        assert tally.cancelled[f"{op}/unpaused"] > 0, tally.as_dict()
        assert tally.landed_paused[op] > 0, tally.as_dict()


# -- the asyncio transport layer -----------------------------------------------------
async def asyncio_cancel(p: Plan, op: Awaitable[Any], conn: Callable[[], A.TLSConnection | None],
                         tally: Tally, kind: str) -> tuple[bool, Any]:
    """Run ``op`` as a task and cancel it at the plan's trigger: (cancelled, result)."""
    task = asyncio.ensure_future(op)
    was_paused = False

    def paused() -> bool:
        c = conn()
        try:
            return c is not None and c.pending_operation is not None
        except A.ConnectionFreedError:
            return False

    if p.trigger >= 0:
        if p.after_pause:
            for _ in range(20_000):
                if task.done() or paused():
                    break
                await asyncio.sleep(0)
        for _ in range(p.trigger):
            await asyncio.sleep(0)
    was_paused = paused()
    task.cancel()
    try:
        result = await task
    except asyncio.CancelledError:
        if task.cancelled() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
            tally.cancelled[kind] += 1
            if was_paused:
                tally.landed_paused[p.op] += 1
            return True, None
        raise
    tally.completed_first[kind] += 1
    return False, result


def test_cancellation_storm_asyncio_layer(contexts: Contexts, published: None) -> None:
    """The asyncio layer (our transport under asyncio's streams): the same storm.

    The server side's handshake runs inside the protocol (no task of the
    application's to cancel: its bound is ``ssl_handshake_timeout``), so a
    server victim has its read, write or close cancelled.  A cancelled
    ``drain()`` leaves the data buffered: everything must arrive.
    """
    rng = random.Random(f"{SEED}/asyncio-layer")
    plans = [plan(i, rng) for i in range(STORM)]
    for p in plans:
        if p.op == "handshake":
            p.victim = "client"
    tally = Tally()
    errors_logged: list[dict[str, Any]] = []
    pending: dict[int, asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def side(side: str, p: Plan, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, got: dict[str, bytes]) -> None:
        other = "client" if side == "server" else "server"
        victim = p.victim == side
        kind = f"{p.op}/{'paused' if p.paused else 'unpaused'}"
        conn = lambda: writer.get_extra_info("ssl_object")  # noqa: E731
        mine, expect = p.data(side), len(p.data(other))
        received = bytearray()

        async def write_all() -> None:
            pos = 0
            for i, n in enumerate(p.sizes[side]):
                writer.write(mine[pos:pos + n])
                pos += n
                if victim and p.op == "write" and i == p.cancel_at_chunk:
                    await asyncio_cancel(p, writer.drain(), conn, tally, kind)
                else:
                    await writer.drain()

        async def read_all() -> None:
            reads = 0
            while len(received) < expect:
                if victim and p.op == "read" and reads == p.cancel_at_chunk:
                    _, data = await asyncio_cancel(p, reader.read(65536), conn, tally, kind)
                else:
                    data = await reader.read(65536)
                if data is None:
                    pass
                elif not data:
                    break
                else:
                    received.extend(data)
                reads += 1

        try:
            await asyncio.gather(write_all(), read_all())
        except CLEAN as exc:
            tally.peer_errors[type(exc).__name__] += 1
        got[side] = bytes(received)
        writer.close()
        if victim and p.op == "shutdown":
            # (asyncio's wait_closed() is not cancellation-safe: the cancel
            # cancels the writer's shared close future, so no second wait)
            await asyncio_cancel(p, writer.wait_closed(), conn, tally, kind)
        else:
            try:
                async with asyncio.timeout(5):
                    await writer.wait_closed()
            except (*CLEAN, TimeoutError):
                writer.transport.abort()
        assert writer.transport.is_closing()

    async def on_server_connection(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        index = int.from_bytes(await reader.readexactly(4), "big")
        pending[index].set_result((reader, writer))

    async def run_one(p: Plan, port: int, limit: asyncio.Semaphore) -> None:
        async with limit:
            got: dict[str, bytes] = {}
            loop = asyncio.get_running_loop()
            pending[p.index] = loop.create_future()
            made: list[A.TLSConnection] = []
            _made.set(made)
            kind = f"handshake/{'paused' if p.paused else 'unpaused'}"
            async with asyncio.timeout(PER_CONNECTION):
                connect = AA.open_connection("127.0.0.1", port, ssl=contexts.client[p.paused],
                                             server_hostname="localhost")
                if p.op == "handshake":
                    cancelled, pair = await asyncio_cancel(
                        p, connect, lambda: made[-1] if made else None, tally, kind)
                    if cancelled:
                        del pending[p.index]
                        tally.connections += 1
                        return
                else:
                    pair = await connect
                c_reader, c_writer = pair
                c_writer.write(p.index.to_bytes(4, "big"))
                s_reader, s_writer = await pending[p.index]
                del pending[p.index]
                await asyncio.gather(side("client", p, c_reader, c_writer, got),
                                     side("server", p, s_reader, s_writer, got))
            for s, o in (("server", "client"), ("client", "server")):
                tally.bytes_checked += check_prefix(got[s], p.data(o), at_least=len(p.data(o)),
                                                    what=f"connection {p.index} (seed {SEED}) {p}")
            tally.connections += 1

    async def main() -> tuple[dict[str, int], int]:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors_logged.append(context))
        server = await AA.start_server(on_server_connection, "127.0.0.1", 0,
                                       ssl=contexts.server[False])
        paused_server = await AA.start_server(on_server_connection, "127.0.0.1", 0,
                                              ssl=contexts.server[True])
        ports = {False: server.sockets[0].getsockname()[1],
                 True: paused_server.sockets[0].getsockname()[1]}
        warm = plan(STORM, random.Random(1))
        warm.op = "read"
        await run_one(warm, ports[warm.paused], asyncio.Semaphore(1))
        tally.__dict__.update(Tally().__dict__)
        fds = open_fds()
        limit = asyncio.Semaphore(CONCURRENCY)
        await asyncio.gather(*(run_one(p, ports[p.paused], limit) for p in plans))
        server.close()
        paused_server.close()
        await server.wait_closed()
        await paused_server.wait_closed()
        gc.collect()
        waiters = await settle_dispatcher()
        for _ in range(100):
            if open_fds() <= fds - 2:   # the two listening sockets are closed too
                break
            await asyncio.sleep(0.01)
        return waiters, open_fds() - (fds - 2)

    before = counters()
    t0 = time.monotonic()
    waiters, fd_growth = asyncio.run(main())
    after = counters()
    report("asyncio layer", tally, time.monotonic() - t0)
    assert errors_logged == []
    assert after == before
    assert waiters == {"waiters": 0, "job_waiters": 0}
    assert fd_growth <= 0
    assert contexts.offload.stats().in_flight == 0
    assert tally.connections == STORM
    for op in OPS:
        assert sum(tally.cancelled[f"{op}/{k}"] for k in ("paused", "unpaused")) > 0, (
            tally.as_dict())
    assert tally.landed_paused["handshake"] > 0 and tally.landed_paused["read"] > 0, (
        tally.as_dict())
