"""Property tests for the driver: whatever both ends of a TLS stream do, in any
interleaving, the bytes that arrive are what was sent, the errors are clean ones,
and nothing hangs or leaks.

Theory of what is proved
------------------------
Hypothesis draws a *program* for each end of a connected pair: a sender task's
list (send a framed chunk, send_eof, aclose, sleep, yield, set engine faults,
switch record pauses) and a receiver task's list (receive(max_bytes), sleep);
any operation of ours may be cancelled after a drawn delay or after a drawn
number of scheduler checkpoints.  Both ends run their two tasks at once, so
sends, receives, cancellations and closes interleave in both directions.
After its program a sender ends its direction (send_eof, or aclose when its
stream is broken) and a receiver reads until the end of the stream; then
each side closes.  Peers: our stream against our stream (over the native
socket path and over memory BIOs, on loopback TCP), and our stream against anyio's own
TLSStream over the stdlib's ``ssl`` (as client and as server), so the
property is not only us agreeing with ourselves; on asyncio and trio; each of
our ends inline (no offload), offloaded (handshake pauses) or with record
pauses (every read, write and shutdown pauses), TLS 1.2 or 1.3.

Every chunk is a frame: a direction tag, its sequence number, its size, then
the bytes the sender kept a copy of.  The driver's documented semantics
(``Driver.write``, the driver's module docstring) say: a send that returned
was delivered; a cancelled send delivered nothing, or all of it, or (cancelled
between records or inside the transport's send) a prefix, and then the stream
is broken; a cancelled receive loses nothing.  So, for each direction:

1. what arrived parses as whole frames, in strictly increasing sequence
   order (no duplication, no reordering), each byte-identical to the frame
   sent, optionally followed by one prefix of a later frame (a torn tail);
2. a frame is missing between two that arrived only if its send did not
   return normally (cancelled or failed): no loss in the middle;
3. if the receiver saw the peer's close_notify (EndOfStream) without having
   closed its own stream first, there is no torn tail and every send that
   returned is there; with no send cancelled or failed, what arrived is
   exactly everything sent;
4. a torn tail whose send was cancelled means the sender's stream reported
   itself broken.

And for every program: every error an operation raised is a clean one
(``ssl.SSLError``, anyio's ``BrokenResourceError``, ``EndOfStream``,
``ClosedResourceError``, or the cancellation we asked for, absorbed by its
scope); the whole program finishes within ``BOUND`` seconds (a timeout is a
hang); afterwards no async job is paused, no connection is parked or alive,
the engine has nothing in flight, and no file descriptor leaked.

Runs ``ASYNCSSL_PROPERTY_EXAMPLES`` examples per test and backend (default
75: the four tests take about 20 s on two shared cores); a long run sets it
higher (e.g. 1000).  ``ASYNCSSL_PROPERTY_BOUND`` changes the hang bound.
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import anyio
import anyio.lowlevel
import pytest
import sniffio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSStream
from conftest import Pki
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import anyio_asyncssl as A
from anyio_asyncssl.dispatch import current_dispatcher
from anyio_asyncssl.stream import AsyncTLSAttribute, AsyncTLSStream
from anyio_asyncssl.testing import TestEngine

pytestmark = pytest.mark.anyio

EXAMPLES = int(os.environ.get("ASYNCSSL_PROPERTY_EXAMPLES", "75"))
# seconds for one program: generous (2 shared cores); a timeout is a hang
BOUND = float(os.environ.get("ASYNCSSL_PROPERTY_BOUND", "10"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large])
CLEAN = (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError)
HEADER = struct.Struct("!2sHI")   # direction tag, sequence number, payload size
V12 = ssl.TLSVersion.TLSv1_2
V13 = ssl.TLSVersion.TLSv1_3

Mode = Literal["inline", "offload", "records"]


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- programs -----------------------------------------------------------------------
@dataclass(frozen=True)
class Cancel:
    """Cancel the operation after ``delay`` seconds, or after ``checkpoints`` yields.

    ``native``: on asyncio, by ``asyncio.timeout`` (a native ``Task.cancel()``,
    which passes anyio's shields) instead of an anyio cancel scope.
    """

    delay: float | None = None
    checkpoints: int | None = None
    native: bool = False


@dataclass(frozen=True)
class Send:
    size: int
    cancel: Cancel | None = None


@dataclass(frozen=True)
class SendEof:
    cancel: Cancel | None = None


@dataclass(frozen=True)
class Close:
    cancel: Cancel | None = None


@dataclass(frozen=True)
class Receive:
    max_bytes: int
    cancel: Cancel | None = None


@dataclass(frozen=True)
class Sleep:
    ms: float


@dataclass(frozen=True)
class Yield:
    checkpoints: int


@dataclass(frozen=True)
class Faults:
    """The engine's faults from now on (process-wide: both ends' offloaded work)."""

    latency_ms: float = 0
    late_ms: int = 0
    eagain: int = 0
    early: int = 0
    duplicate: int = 0
    err: int = 0


@dataclass(frozen=True)
class RecordPauses:
    on: bool


SenderOp = Send | SendEof | Close | Sleep | Yield | Faults | RecordPauses
ReceiverOp = Receive | Sleep


@dataclass(frozen=True)
class Program:
    sends: list[SenderOp]
    receives: list[ReceiverOp]


@dataclass(frozen=True)
class End:
    """How one end is set up: ours in a mode on a path, or anyio's TLSStream on ssl."""

    ours: bool
    mode: Mode = "inline"
    native: bool = True
    program: Program = Program([], [])


@dataclass(frozen=True)
class Case:
    version: ssl.TLSVersion
    client: End
    server: End
    latency_ms: float = 0   # the engine's latency from the start (after the handshake)


cancels = st.one_of(
    st.none(), st.none(),
    st.builds(Cancel, checkpoints=st.integers(0, 8)),
    st.builds(Cancel, delay=st.sampled_from([0.0, 0.0005, 0.002, 0.008, 0.02]),
              native=st.booleans()))
sizes = st.one_of(st.integers(0, 2_000), st.integers(2_000, 40_000),
                  st.integers(64 * 1024, 200 * 1024))
faults = st.builds(
    Faults, latency_ms=st.sampled_from([0, 0.2, 2]), late_ms=st.sampled_from([0, 0, 10]),
    eagain=st.integers(0, 2), early=st.integers(0, 2), duplicate=st.integers(0, 2),
    err=st.sampled_from([0, 0, 0, 1]))
sleeps = st.builds(Sleep, st.sampled_from([0, 1, 5]))
yields = st.builds(Yield, st.integers(1, 10))


def programs(ours: bool) -> st.SearchStrategy[Program]:
    """A program for one end; anyio's TLSStream is never cancelled, closed early
    or half-closed (it has no send_eof, and a send it cancels loses ciphertext)."""
    send = st.builds(Send, sizes, cancels if ours else st.none())
    sender_ops: list[st.SearchStrategy[Any]] = [send, send, sleeps, yields, faults,
        st.builds(RecordPauses, st.booleans())]
    receiver_ops: list[st.SearchStrategy[Any]] = [
        st.builds(Receive, st.integers(1, 70_000), cancels if ours else st.none()), sleeps]
    if ours:
        sender_ops += [st.builds(SendEof, cancels), st.builds(Close, cancels)]
    return st.builds(Program, st.lists(st.one_of(sender_ops), max_size=10),
                     st.lists(st.one_of(receiver_ops), max_size=6))


modes: st.SearchStrategy[Mode] = st.sampled_from(["inline", "offload", "records"])


def our_end() -> st.SearchStrategy[End]:
    return st.builds(End, ours=st.just(True), mode=modes, native=st.booleans(),
                     program=programs(True))


def stdlib_end() -> st.SearchStrategy[End]:
    return st.builds(End, ours=st.just(False), program=programs(False))


versions = st.sampled_from([V12, V13])
latencies = st.sampled_from([0, 0.5, 2])
ours_against_ours = st.builds(Case, versions, our_end(), our_end(), latencies)
ours_against_stdlib = st.one_of(st.builds(Case, versions, our_end(), stdlib_end(), latencies),
                                st.builds(Case, versions, stdlib_end(), our_end(), latencies))


# -- contexts (one per configuration, made once: record pauses rebuild a context) ------
_contexts: dict[tuple[Any, ...], Any] = {}


def our_context(pki: Pki, offload: A.Offload, engine: TestEngine, server: bool, mode: Mode,
                version: ssl.TLSVersion) -> A.TLSContext:
    key = ("ours", id(offload), server, mode, version)
    if key not in _contexts:
        off = None if mode == "inline" else offload
        ctx = pki.server_ctx("rsa", offload=off) if server else pki.client_ctx(offload=off)
        ctx.minimum_version = ctx.maximum_version = version
        if mode == "records":
            engine.enable_record_pauses(ctx)
        _contexts[key] = ctx
    ctx = _contexts[key]
    assert isinstance(ctx, A.TLSContext)
    return ctx


def stdlib_context(pki: Pki, server: bool, version: ssl.TLSVersion) -> ssl.SSLContext:
    key = ("stdlib", str(pki.tmp), server, version)
    if key not in _contexts:
        if server:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki.rsa_file)
        else:
            ctx = ssl.create_default_context(cafile=str(pki.ca_file))
            if hasattr(ssl, "OP_IGNORE_UNEXPECTED_EOF"):
                ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF   # a ragged EOF is an error
        ctx.minimum_version = ctx.maximum_version = version
        _contexts[key] = ctx
    ctx = _contexts[key]
    assert isinstance(ctx, ssl.SSLContext)
    return ctx


# -- running a program -----------------------------------------------------------------
@dataclass
class Sent:
    frame: bytes
    outcome: str = "pending"   # "ok", "cancelled", "error: <type>"


@dataclass
class Side:
    """One end at run time, and what it saw."""

    name: str
    tag: bytes
    end: End
    stream: ByteStream
    sent: list[Sent] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    receiver_end: str = "running"
    closed_itself: bool = False   # its own aclose began before its receiver ended
    broken: bool = False          # our stream reported itself broken (before the final close)
    pauses: int = 0               # our stream's jobs paused after the handshake
    unclean: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, engine: TestEngine, deadline: anyio.CancelScope) -> None:
        self.engine = engine
        self.deadline = deadline

    async def attempt(self, side: Side, what: str, op: Callable[[], Awaitable[None]],
                      cancel: Cancel | None, tg: TaskGroup) -> str:
        """Run ``op`` under its drawn cancellation; its outcome in words.

        An exception outside :data:`CLEAN` is recorded as unclean; a
        cancellation we did not ask for (other than the hang bound's) too.
        """
        scope = anyio.CancelScope()
        helper = anyio.CancelScope()
        native = (cancel is not None and cancel.native and cancel.delay is not None
                  and sniffio.current_async_library() == "asyncio")
        timed_out = False
        if cancel is not None and not native:
            if cancel.delay is not None:
                scope.deadline = anyio.current_time() + cancel.delay
            elif cancel.checkpoints == 0:
                scope.cancel()
            else:
                tg.start_soon(self._cancel_after_checkpoints, scope, helper,
                              cancel.checkpoints or 0)
        try:
            with scope:
                if native:
                    assert cancel is not None and cancel.delay is not None
                    try:
                        async with asyncio.timeout(cancel.delay):
                            await op()
                    except TimeoutError:
                        timed_out = True   # the native cancellation we asked for
                else:
                    await op()
        except CLEAN as exc:
            outcome = f"error: {type(exc).__name__}"
        except anyio.get_cancelled_exc_class():
            if not self.deadline.cancel_called:
                side.unclean.append(f"{what}: a cancellation nobody asked for")
            raise
        except Exception as exc:
            side.unclean.append(f"{what}: {exc!r}")
            outcome = f"unclean: {type(exc).__name__}"
        else:
            outcome = "cancelled" if scope.cancelled_caught or timed_out else "ok"
        finally:
            helper.cancel()
        side.log.append(f"{what} -> {outcome}")
        return outcome

    @staticmethod
    async def _cancel_after_checkpoints(scope: anyio.CancelScope, helper: anyio.CancelScope,
                                        n: int) -> None:
        with helper:
            for _ in range(n):
                await anyio.lowlevel.checkpoint()
            scope.cancel()

    async def sender(self, side: Side, tg: TaskGroup) -> None:
        stream = side.stream
        for op in side.end.program.sends:
            if isinstance(op, Send):
                seq = len(side.sent)
                record = Sent(HEADER.pack(side.tag, seq, op.size) + os.urandom(op.size))
                side.sent.append(record)
                record.outcome = await self.attempt(
                    side, f"send #{seq} ({op.size} B)",
                    partial(stream.send, record.frame), op.cancel, tg)
            elif isinstance(op, SendEof):
                await self.attempt(side, "send_eof", stream.send_eof, op.cancel, tg)
            elif isinstance(op, Close):
                if side.receiver_end == "running":
                    side.closed_itself = True
                await self.attempt(side, "aclose", stream.aclose, op.cancel, tg)
            elif isinstance(op, Sleep):
                await anyio.sleep(op.ms / 1000)
            elif isinstance(op, Yield):
                for _ in range(op.checkpoints):
                    await anyio.lowlevel.checkpoint()
            elif isinstance(op, Faults):
                self.engine.set(latency_ms=op.latency_ms, late_ms=op.late_ms, eagain=op.eagain,
                                early=op.early, duplicate=op.duplicate, err=op.err)
            elif isinstance(op, RecordPauses):
                self.engine.set_record_pauses(op.on)
        if not isinstance(stream, AsyncTLSStream):
            return   # anyio's TLSStream cannot half-close: it closes once its receiver is done
        # end this direction: close_notify, or (broken: no close_notify can
        # follow a torn record) close, so that the peer's receiver ends
        d = stream._driver
        if d.closed:
            return
        if d.broken is None:
            outcome = await self.attempt(side, "final send_eof", stream.send_eof, None, tg)
            if outcome == "ok":
                return
        side.broken = side.broken or d.broken is not None
        if side.receiver_end == "running":
            side.closed_itself = True
        await self.attempt(side, "aclose (broken)", stream.aclose, None, tg)

    async def receiver(self, side: Side, tg: TaskGroup) -> None:
        stream = side.stream

        async def receive(max_bytes: int) -> None:
            data = await stream.receive(max_bytes)
            if len(data) > max_bytes:
                side.unclean.append(f"receive({max_bytes}) returned {len(data)} bytes")
            side.received += data

        ops = list(side.end.program.receives)
        while True:
            op = ops.pop(0) if ops else Receive(65536)
            if isinstance(op, Sleep):
                await anyio.sleep(op.ms / 1000)
                continue
            outcome = await self.attempt(side, f"receive({op.max_bytes})",
                                         partial(receive, op.max_bytes), op.cancel, tg)
            if outcome.startswith("error: EndOfStream"):
                side.receiver_end = "eof"
                return
            if outcome.startswith(("error", "unclean")):
                side.receiver_end = outcome
                return

    async def run_side(self, side: Side, tg: TaskGroup) -> None:
        handshake_pauses = pauses(side.stream)
        async with anyio.create_task_group() as own:
            own.start_soon(self.sender, side, tg)
            own.start_soon(self.receiver, side, tg)
        if isinstance(side.stream, AsyncTLSStream):
            side.broken = side.broken or side.stream._driver.broken is not None
        await self.attempt(side, "final aclose", side.stream.aclose, None, tg)
        side.pauses = pauses(side.stream) - handshake_pauses


def pauses(stream: ByteStream) -> int:
    """How many times our stream's operations paused for the engine so far."""
    if isinstance(stream, AsyncTLSStream):
        return stream.extra(AsyncTLSAttribute.pauses)
    return 0


async def connect(case: Case, pki: Pki, offload: A.Offload,
                  engine: TestEngine) -> tuple[ByteStream, ByteStream]:
    """(client, server) of ``case``, handshaken concurrently over loopback TCP.

    TCP, not a socketpair: on asyncio, anyio's UNIX socket stream leaves its
    reader armed after a cancelled receive, and the readiness that follows
    sets the cancelled future (an ``InvalidStateError`` in the loop).
    """
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as multi:
        port = multi.extra(SocketAttribute.local_port)
        client_transport = await anyio.connect_tcp("127.0.0.1", port)
        server_transport = await cast(Any, multi.listeners[0]).accept()
    transports = [client_transport, server_transport]
    streams: list[ByteStream | None] = [None, None]

    async def wrap(i: int, end: End, server: bool) -> None:
        if end.ours:
            streams[i] = await AsyncTLSStream.wrap(
                transports[i], server_side=server, hostname=None if server else "localhost",
                context=our_context(pki, offload, engine, server, end.mode, case.version),
                native_socket=end.native)
        else:
            streams[i] = await TLSStream.wrap(
                transports[i], server_side=server, hostname=None if server else "localhost",
                ssl_context=stdlib_context(pki, server, case.version))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wrap, 0, case.client, False)
            tg.start_soon(wrap, 1, case.server, True)
    except BaseException:
        with anyio.CancelScope(shield=True):
            for t in (*streams, *transports):
                if t is not None:
                    await anyio.aclose_forcefully(t)
        raise
    assert streams[0] is not None and streams[1] is not None
    return streams[0], streams[1]


# -- the property --------------------------------------------------------------------
def check_direction(sender: Side, receiver: Side) -> bool:
    """Rules 1 to 4 of the module docstring for what ``receiver`` got from ``sender``.

    Returns whether the receiver got a torn tail.
    """
    got = bytes(receiver.received)
    sent = sender.sent
    where = f"{sender.name} -> {receiver.name}"
    pos, last, tail_seq = 0, -1, None
    while pos < len(got):
        rest = got[pos:]
        if len(rest) < HEADER.size:
            later = [s.frame for s in sent[last + 1:]]
            assert any(f.startswith(rest) for f in later), f"{where}: garbage at {pos}"
            tail_seq = last + 1   # (which one is told by the frames before it)
            break
        tag, seq, size = HEADER.unpack_from(rest)
        assert tag == sender.tag, f"{where}: not a frame at byte {pos}: {rest[:16]!r}"
        assert seq > last, f"{where}: frame #{seq} after #{last} (duplicated or reordered)"
        assert seq < len(sent), f"{where}: frame #{seq} was never sent"
        frame = sent[seq].frame
        assert HEADER.size + size == len(frame), f"{where}: frame #{seq} has a wrong size"
        for skipped in sent[last + 1:seq]:
            assert skipped.outcome != "ok", (
                f"{where}: frame #{sent.index(skipped)} lost before #{seq}")
        if len(rest) < len(frame):
            assert frame.startswith(rest), f"{where}: torn frame #{seq} is not its prefix"
            tail_seq = seq
            break
        assert rest[:len(frame)] == frame, f"{where}: frame #{seq} corrupted"
        last = seq
        pos += len(frame)
    if receiver.receiver_end == "eof" and not receiver.closed_itself:
        assert tail_seq is None, f"{where}: torn frame #{tail_seq} before close_notify"
        missing = [i for i, s in enumerate(sent[last + 1:], last + 1) if s.outcome == "ok"]
        assert not missing, f"{where}: sends {missing} returned but never arrived"
        if all(s.outcome == "ok" for s in sent):
            assert got == b"".join(s.frame for s in sent), where
    if tail_seq is not None and tail_seq < len(sent) and sent[tail_seq].outcome == "cancelled":
        if receiver.receiver_end != "eof" and not receiver.closed_itself and not receiver.broken:
            assert sender.broken, f"{where}: cancelled send #{tail_seq} was torn, stream not broken"
    return tail_seq is not None


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(offload: A.Offload, baseline: dict[str, int]) -> dict[str, int]:
    """Collect and reap until the counters are back to ``baseline`` (bounded)."""
    deadline = time.monotonic() + 10
    while True:
        A.reap_parked()
        now = A.connection_counters()
        in_flight = offload.stats().in_flight
        settled = in_flight == 0 and all(now[k] <= baseline[k]
                                         for k in ("live", "paused_now", "parked_now"))
        if settled or time.monotonic() > deadline:
            break
        gc.collect()   # (only when needed: a full collection costs more than a program)
        await anyio.sleep(0.01)
    assert in_flight == 0, "the engine still has work in flight"
    assert now["paused_now"] <= baseline["paused_now"], "an async job was left paused"
    assert now["parked_now"] <= baseline["parked_now"], "a parked connection was never reaped"
    assert now["live"] <= baseline["live"], "a connection was never freed"
    return now


async def run_case(case: Case, pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    engine.clear()
    engine.set_record_pauses(True)
    current_dispatcher()   # its eventfd belongs to the loop, not to this example
    baseline = A.connection_counters()
    fds = open_fds()
    sides: list[Side] = []
    try:
        with anyio.CancelScope() as bound:
            bound.deadline = anyio.current_time() + BOUND
            client, server = await connect(case, pki, offload, engine)
            engine.set(latency_ms=case.latency_ms)
            sides = [Side("client", b"c>", case.client, client),
                     Side("server", b"s>", case.server, server)]
            runner = Runner(engine, bound)
            async with anyio.create_task_group() as tg:
                async with anyio.create_task_group() as both:
                    for side in sides:
                        both.start_soon(runner.run_side, side, tg)
                tg.cancel_scope.cancel()   # checkpoint cancellers still waiting
            del client, server
        for side in sides:
            note(f"{side.name}: {side.log}; receiver {side.receiver_end}, "
                 f"{len(side.received)} B, broken={side.broken}")
        assert not bound.cancelled_caught, f"the program did not finish within {BOUND} s (a hang)"
        for side in sides:
            assert not side.unclean, f"{side.name}: unclean outcomes {side.unclean}"
        for sender, receiver in (sides, sides[::-1]):
            if check_direction(sender, receiver):
                event("a torn tail arrived")
        for side in sides:
            # what the examples covered (--hypothesis-show-statistics)
            event(f"receiver ended: {side.receiver_end}")
            if side.broken:
                event("a stream broke")
            if side.pauses:
                event("reads, writes or shutdowns paused")
            if side.closed_itself:
                event("closed while its receiver ran")
            for line in side.log:
                if line.endswith("-> cancelled"):
                    event(f"cancelled: {line.split(' ')[0].split('(')[0]}")
        for side in sides:
            side.stream = None  # type: ignore[assignment]
    finally:
        engine.clear()
        engine.set_record_pauses(True)
        with anyio.CancelScope(shield=True):
            for side in sides:   # (a failed example: the next one starts clean)
                if side.stream is not None:
                    await anyio.aclose_forcefully(side.stream)
    await settle(offload, baseline)
    assert open_fds() <= fds, "a file descriptor leaked"


@PROPERTY
@given(case=ours_against_ours)
async def test_any_program_between_our_streams_delivers_a_prefix_and_ends(
        pki: Pki, offload: A.Offload, engine: TestEngine, case: Case) -> None:
    await run_case(case, pki, offload, engine)


@PROPERTY
@given(case=ours_against_stdlib)
async def test_any_program_against_the_stdlibs_tls_delivers_a_prefix_and_ends(
        pki: Pki, offload: A.Offload, engine: TestEngine, case: Case) -> None:
    await run_case(case, pki, offload, engine)
