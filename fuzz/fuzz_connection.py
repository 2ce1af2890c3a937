#!/usr/bin/env python3
"""Coverage-guided fuzz target for the sans-IO core (:class:`TLSConnection`).

Theory of operation
-------------------
One input is a small *script* that plays a man in the middle between two
connections of ours: the connection under test (the CUT, server or client)
and an honest peer.  Everything the peer sends goes through a *wire* buffer
the script may corrupt before the CUT reads it: overwrite, insert, delete or
flip bytes at a position, or append whole records of any content type.
Mutating live traffic is far more productive than raw noise: record
headers, handshake framing and the AEAD-protected records around the
corruption stay real, so OpenSSL's parsers get past their first length check.
What the CUT sends reaches the peer unchanged (fuzz the other role for the
other direction).

Byte 0 picks the role and the configuration: TLS 1.3 or 1.2, plain, the
offload's handshake pause (the private-key operation runs on a worker and
the job pauses), the test engine's record pauses (every record cipher call
pauses, so reads, writes and shutdowns pause too), mutual TLS.  The rest are
actions (see ``Action``): the peer's turn, one step of the CUT, the wire's
corruptions, explicit operations of either side, feeding the wire *while the
CUT's job is paused*, engine faults (EAGAIN, ERR, early and duplicate
wake-ups), EOF, and dropping the CUT with its job paused (it is parked).
So every state is reachable: fresh, mid-handshake after any number of honest
flights, paused, established, after close_notify, after a failure.

The oracle (:class:`Finding` when violated):

* every call answers a :class:`Status` (with a ``bytes`` read and a write
  count within its data) or raises a :class:`TLSError` (an ``ssl.SSLError``:
  ``OperationInProgressError``, ``ConnectionFreedError``, ``TLSEOFError``,
  ...); anything else is a finding, and so is a failure reported while the
  operation's job is still paused (rule 4);
* integrity: what the CUT decrypts is a prefix of what the peer wrote (the
  corruptions cannot forge AEAD records), and the same the other way;
* no hang: every loop is bounded, a job that never finishes is a finding;
* no leak: once both connections are freed and parked ones reaped,
  ``connection_counters()`` shows as many paused, parked and live
  connections as before the input.

Everything costly is made once (:func:`harness`): an :class:`Offload` with
one worker, EC P-256 certificates, one context pair per configuration.
Coverage of our Python comes from atheris' instrumentation; OpenSSL is not
instrumented, so each distinct *outcome transition* (the previous event and
this one: ``server read -> TLSError DECODE_ERROR``) also lands on its own
branch of an instrumented decision tree (:func:`_feedback`): libFuzzer keeps
inputs that reach new OpenSSL failure modes.

``run_one(data)`` is the target without atheris (``tests/test_fuzz_corpus.py``
replays the corpus and the crash reproducers through it); atheris is imported
only when the file runs as a script (``fuzz/README.md``).
"""

from __future__ import annotations

import enum
import gc
import importlib
import shutil
import ssl
import struct
import sys
import tempfile
import time
import types
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio_asyncssl as A
from anyio_asyncssl.testing import TestEngine

#: bounds of one input: actions run, bytes on the wire, time one job may take
MAX_ACTIONS = 48
MAX_WIRE = 64 * 1024
JOB_DEADLINE = 5.0        # s: a job the one-worker engine has not finished by then hangs
WORKER_LATENCY_MS = 0.1   # every offloaded operation takes this long on the worker
PEER_ROUNDS = 16          # honest peer steps per turn
HONEST_ROUNDS = 12        # rounds of the HONEST action
PEER_DATA = b"honest application data from the peer. "
CUT_DATA = b"the connection under test writes this. "


class Finding(AssertionError):
    """The connection broke a rule of its contract: what the fuzzer looks for."""


# -- set-up made once ---------------------------------------------------------------
class Config(enum.IntEnum):
    """What byte 0 (after the role bit) selects."""

    TLS13_PLAIN = 0
    TLS13_HANDSHAKE_PAUSE = 1      # the server's signature is offloaded: its handshake pauses
    TLS13_RECORD_PAUSES = 2        # both sides: every record cipher call pauses
    TLS12_PLAIN = 3
    TLS12_RECORD_PAUSES = 4        # offloaded signature, record pauses, TLS 1.2 framing
    TLS13_MUTUAL = 5               # client certificates; the client's signature pauses too
    TLS12_MUTUAL_PAUSES = 6


@dataclass
class Harness:
    offload: A.Offload
    engine: TestEngine
    cert_file: Path
    contexts: dict[Config, tuple[A.TLSContext, A.TLSContext]] = field(default_factory=dict)

    def pair(self, config: Config) -> tuple[A.TLSContext, A.TLSContext]:
        """(server context, client context) for ``config``, made on first use."""
        made = self.contexts.get(config)
        if made is None:
            made = self.contexts[config] = self._make(config)
        return made

    def _make(self, config: Config) -> tuple[A.TLSContext, A.TLSContext]:
        pauses = config in (Config.TLS13_RECORD_PAUSES, Config.TLS12_RECORD_PAUSES,
                            Config.TLS12_MUTUAL_PAUSES)
        offloaded = config is not Config.TLS13_PLAIN and config is not Config.TLS12_PLAIN
        mutual = config in (Config.TLS13_MUTUAL, Config.TLS12_MUTUAL_PAUSES)
        off = self.offload if offloaded else None
        server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        server.load_cert_chain(self.cert_file)
        client = A.create_default_context(cafile=str(self.cert_file), offload=off)
        if mutual:
            server.verify_mode = ssl.CERT_REQUIRED
            server.load_verify_locations(str(self.cert_file))
            client.load_cert_chain(self.cert_file)
        if config in (Config.TLS12_PLAIN, Config.TLS12_RECORD_PAUSES,
                      Config.TLS12_MUTUAL_PAUSES):
            server.maximum_version = ssl.TLSVersion.TLSv1_2
            client.maximum_version = ssl.TLSVersion.TLSv1_2
        if pauses:
            self.engine.enable_record_pauses(server)
            self.engine.enable_record_pauses(client)
        return server, client

    def close(self) -> None:
        self.contexts.clear()
        self.offload.close()
        shutil.rmtree(self.cert_file.parent, ignore_errors=True)


_harness: Harness | None = None


def harness() -> Harness:
    """The process's offload, certificate and contexts (made on the first call)."""
    global _harness
    if _harness is None:
        offload = A.Offload(workers=1, priority="normal")
        engine = TestEngine(offload)
        cert, key = A.generate_self_signed("localhost", key_type="ec")
        folder = Path(tempfile.mkdtemp(prefix="asyncssl-fuzz-"))
        cert_file = folder / "localhost.pem"
        cert_file.write_bytes(key + cert)
        _harness = Harness(offload, engine, cert_file)
    return _harness


def close_harness() -> None:
    """Free the contexts and stop the offload's worker (for tests that replay inputs)."""
    global _harness
    if _harness is not None:
        _harness.close()
        _harness = None


# -- the script ---------------------------------------------------------------------
class Action(enum.IntEnum):
    """One script step (the byte modulo the number of actions)."""

    PEER = 0           # the peer takes what the CUT sent, runs its handshake or reads
    CUT = 1            # one call of the CUT's natural operation, with the wire as input
    SETTLE = 2         # the CUT's natural operation until it no longer answers WANT_ASYNC
    OVERWRITE = 3      # u16 position, blob: overwrite the wire there
    INSERT = 4         # u16 position, blob
    DELETE = 5         # u16 position, u8 count
    RECORD = 6         # u8 content type, blob: append a record with that header
    CUT_OP = 7         # u8 which, blob: an explicit operation of the CUT
    FLIP = 8           # u16 position, u8 bit
    DROP = 9           # drop the CUT now, paused or not (parked if paused); the script ends
    HONEST = 10        # both sides' turns until the handshake is done and the wire quiet
    PEER_OP = 11       # u8 which, blob: an explicit operation of the peer
    FEED = 12          # the wire into the CUT without a step (a paused job stays paused)
    FAULT = 13         # u8 which: the engine's next offloaded operation misbehaves
    RAW = 14           # blob: append bytes to the wire as they are


class CutOp(enum.IntEnum):
    HANDSHAKE = 0
    READ = 1
    WRITE = 2
    SHUTDOWN = 3
    KEY_UPDATE = 4
    EOF = 5
    READ_ZERO = 6


class PeerOp(enum.IntEnum):
    WRITE = 0
    SHUTDOWN = 1
    KEY_UPDATE = 2


#: what a FAULT action does to the engine's next offloaded operation
FAULTS: tuple[Callable[[TestEngine], None], ...] = (
    lambda engine: engine.set(eagain=1),      # queue full: retry later
    lambda engine: engine.set(err=1),         # the engine fails: AsyncEngineError
    lambda engine: engine.set(early=1),       # a wake-up before the pause
    lambda engine: engine.set(duplicate=1),   # the completion's wake-up twice
)

#: record content types a RECORD action uses (then any byte)
RECORD_TYPES = (20, 21, 22, 23, 24)


class Reader:
    """Consumes a script; reads past the end yield zeros (never an exception)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def blob(self) -> bytes:
        """A u8 length, then that many bytes (fewer at the end of the input)."""
        n = self.u8()
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def encode(config: Config, cut_is_client: bool, *actions: Sequence[int | bytes]) -> bytes:
    """A script from readable parts (seeds and tests): each action is (Action, args...).

    Integer arguments are single bytes, except the u16 position of OVERWRITE,
    INSERT, DELETE and FLIP; ``bytes`` arguments are blobs (a length byte, then them).
    """
    out = bytearray([int(config) << 1 | int(cut_is_client)])
    for action, *args in actions:
        out.append(int(action))
        for i, arg in enumerate(args):
            if isinstance(arg, bytes):
                assert len(arg) < 256
                out += bytes([len(arg)]) + arg
            elif i == 0 and action in (Action.OVERWRITE, Action.INSERT, Action.DELETE,
                                       Action.FLIP):
                out += struct.pack(">H", arg)
            else:
                out.append(arg)
    return bytes(out)


# -- one run ------------------------------------------------------------------------
Status = A.Status
_STATUSES = frozenset(Status)
_OPERATIONS = {"handshake": A.Operation.HANDSHAKE, "read": A.Operation.READ,
               "write": A.Operation.WRITE, "shutdown": A.Operation.SHUTDOWN}


def _pending(conn: A.TLSConnection) -> A.Operation | None:
    """The connection's paused operation (None once it is freed)."""
    try:
        return conn.pending_operation
    except A.ConnectionFreedError:
        return None


class Run:
    """The two connections, the wire between them and what each side wrote and read."""

    def __init__(self, h: Harness, config: Config, cut_is_client: bool) -> None:
        server_ctx, client_ctx = h.pair(config)
        server = A.TLSConnection(server_ctx, server_side=True)
        client = A.TLSConnection(client_ctx, server_hostname="localhost")
        self.engine = h.engine
        self.cut, self.peer = (client, server) if cut_is_client else (server, client)
        self.wire = bytearray()          # peer -> CUT, corruptible
        self.events: list[str] = []
        self.peer_sent = bytearray()
        self.peer_got = bytearray()
        self.cut_sent = bytearray()
        self.cut_got = bytearray()
        self.peer_alive = True
        self.cut_dropped = False
        self.pending_write = b""         # the data of the CUT's paused write (rule 2)

    # -- the oracle ---------------------------------------------------------------
    def call(self, who: str, what: str, fn: Callable[[], Any]) -> Any:
        """Run one TLSConnection call; a documented answer or a Finding."""
        conn = self.cut if who == "cut" else self.peer
        before = _pending(conn)
        try:
            result = fn()
        except A.TLSError as exc:
            if not str(exc):
                raise Finding(f"{who} {what}: {type(exc).__name__} with no message") from exc
            after = _pending(conn)
            if isinstance(exc, A.OperationInProgressError):
                if after is not before:
                    raise Finding(f"{who} {what} was refused ({exc!r}) but the paused "
                                  f"operation went from {before} to {after}") from exc
            elif after is not None and (after is not before or _OPERATIONS.get(what) is after):
                # a refusal of another operation (shutdown while in init) leaves the
                # job as it was; the paused operation itself fails only once its
                # job ended (rule 4)
                raise Finding(f"{who} {what} failed ({exc!r}) with the {after.name} job "
                              f"paused (before the call: {before}; rule 4)") from exc
            self.event(who, what, f"{type(exc).__name__}:{getattr(exc, 'reason', None)}")
            raise
        except Finding:
            raise
        except Exception as exc:
            raise Finding(f"{who} {what} raised an undocumented {exc!r}") from exc
        if what in _OPERATIONS:
            status = result[0] if isinstance(result, tuple) else result
            if status not in _STATUSES:
                raise Finding(f"{who} {what} answered {result!r}, not a Status")
            self.event(who, what, status.name)
        return result

    def attempt(self, who: str, what: str, fn: Callable[[], Any]) -> Any:
        """:meth:`call`, with a TLSError (recorded as an event) answered as None."""
        try:
            return self.call(who, what, fn)
        except A.TLSError:
            return None

    def event(self, who: str, what: str, outcome: str) -> None:
        ev = f"{who} {what} -> {outcome}"
        if not (self.events and self.events[-1] == ev):   # a retried pause is one event
            self.events.append(ev)

    def check_integrity(self) -> None:
        if not self.peer_sent.startswith(self.cut_got):
            raise Finding(f"the CUT read {bytes(self.cut_got[-64:])!r}..., which the peer "
                          "never wrote (a forged or reordered record was accepted)")
        if not self.cut_sent.startswith(self.peer_got):
            raise Finding("the peer read data the CUT never wrote")

    # -- the CUT ------------------------------------------------------------------
    def take_wire(self) -> bytes:
        data = bytes(self.wire)
        self.wire.clear()
        return data

    def cut_step(self, op: CutOp, data: bytes = b"", incoming: bytes = b"") -> Status | None:
        """One call of ``op`` on the CUT; None when it raised (recorded as an event)."""
        cut = self.cut
        try:
            if op is CutOp.HANDSHAKE:
                st: Status = self.call("cut", "handshake", lambda: cut.do_handshake(incoming))
            elif op is CutOp.READ or op is CutOp.READ_ZERO:
                size = 0 if op is CutOp.READ_ZERO else 65536
                st, got = self.call("cut", "read", lambda: cut.read(size, incoming))
                if not isinstance(got, bytes) or (st is not Status.DONE and got):
                    raise Finding(f"read answered {st!r} with {got!r}")
                self.cut_got += got
            elif op is CutOp.WRITE:
                st, n = self.call("cut", "write", lambda: cut.write(data, incoming))
                if not 0 <= n <= len(data) or (st is not Status.DONE and n):
                    raise Finding(f"write of {len(data)} bytes answered {st!r}, {n!r}")
                self.pending_write = data if st is Status.WANT_ASYNC else b""
                self.cut_sent += data[:n]
            elif op is CutOp.SHUTDOWN:
                st = self.call("cut", "shutdown", lambda: cut.shutdown(incoming))
            elif op is CutOp.KEY_UPDATE:
                self.call("cut", "key_update", lambda: cut.key_update(bool(data)))
                return None
            else:
                self.call("cut", "receive_eof", cut.receive_eof)
                return None
        except A.TLSError:
            return None
        return st

    def natural_op(self) -> tuple[CutOp, bytes]:
        """The operation the CUT would run now: its paused one, else handshake or read."""
        try:
            pending = self.cut.pending_operation
        except A.ConnectionFreedError:
            return CutOp.READ, b""
        if pending is A.Operation.WRITE:
            return CutOp.WRITE, self.pending_write
        if pending is A.Operation.SHUTDOWN:
            return CutOp.SHUTDOWN, b""
        if pending is A.Operation.READ:   # a read before the handshake ends runs it too
            return CutOp.READ, b""
        if pending is A.Operation.HANDSHAKE or not self.cut.handshake_done:
            return CutOp.HANDSHAKE, b""
        return CutOp.READ, b""

    def settle_cut(self, incoming: bytes = b"") -> Status | None:
        """The natural operation, retried while it answers WANT_ASYNC (bounded)."""
        deadline = time.monotonic() + JOB_DEADLINE
        while True:
            op, data = self.natural_op()
            st = self.cut_step(op, data, incoming)
            incoming = b""
            if st is not Status.WANT_ASYNC and st is not Status.WANT_ASYNC_JOB:
                return st
            if time.monotonic() > deadline:
                raise Finding(f"the CUT's {op.name} still answers {st.name} after "
                              f"{JOB_DEADLINE} s (a job that never finishes)")
            time.sleep(0.0001)

    # -- the peer -----------------------------------------------------------------
    def peer_call(self, what: str, fn: Callable[[], Status | tuple[Status, Any]]
                  ) -> Status | tuple[Status, Any] | None:
        """One peer operation retried while paused; None once the peer failed."""
        if not self.peer_alive:
            return None
        deadline = time.monotonic() + JOB_DEADLINE
        try:
            while True:
                result = self.call("peer", what, fn)
                st = result[0] if isinstance(result, tuple) else result
                if st is not Status.WANT_ASYNC and st is not Status.WANT_ASYNC_JOB:
                    return result   # type: ignore[no-any-return]
                if time.monotonic() > deadline:
                    raise Finding(f"the peer's {what} never finished its job")
                time.sleep(0.0001)
        except A.TLSError:
            self.peer_alive = False
            return None
        finally:
            self.wire += self.peer.take_collected_output()

    def peer_turn(self) -> None:
        """The peer takes the CUT's output, then handshakes or reads what there is."""
        if not self.peer_alive:
            return
        if not self.cut_dropped:
            sent = self.attempt("cut", "bytes_to_send", self.cut.bytes_to_send)
            if sent:
                self.attempt("peer", "receive_bytes", lambda: self.peer.receive_bytes(sent))
        for _ in range(PEER_ROUNDS):
            if not self.peer.handshake_done:
                if self.peer_call("handshake", self.peer.do_handshake) is not Status.DONE:
                    return
                continue
            result = self.peer_call("read", lambda: self.peer.read(65536))
            if not isinstance(result, tuple):
                return
            st, got = result
            self.peer_got += got
            if st is not Status.DONE or not got:
                return

    def peer_op(self, which: int, blob: bytes) -> None:
        op = PeerOp(which % len(PeerOp))
        if not self.peer_alive:
            return
        if op is PeerOp.WRITE:
            data = (PEER_DATA * (1 + len(blob)))[:max(1, len(blob) * 64)]
            result = self.peer_call("write", lambda: self.peer.write(data))
            if isinstance(result, tuple) and result[0] is Status.DONE:
                self.peer_sent += data[:result[1]]
        elif op is PeerOp.SHUTDOWN:
            self.peer_call("shutdown", self.peer.shutdown)
        else:
            try:
                self.call("peer", "key_update", lambda: self.peer.key_update(bool(blob)))
            except A.TLSError:
                return
            self.peer_call("handshake", self.peer.do_handshake)   # sends the KeyUpdate

    def honest(self) -> None:
        for _ in range(HONEST_ROUNDS):
            self.peer_turn()
            if self.cut_dropped:
                return
            if not self.wire and self.cut.handshake_done and self.peer.handshake_done:
                return
            self.settle_cut(self.take_wire())

    # -- the wire -----------------------------------------------------------------
    def position(self, pos: int) -> int:
        return pos % (len(self.wire) + 1)

    def grow(self, data: bytes, at: int | None = None) -> None:
        room = MAX_WIRE - len(self.wire)
        data = data[:max(room, 0)]
        if at is None:
            self.wire += data
        else:
            self.wire[at:at] = data

    # -- the end ------------------------------------------------------------------
    def finish(self) -> None:
        """Finish both sides' jobs, free both, reap; the counters must be back."""
        if not self.cut_dropped:
            if self.cut.pending_operation is not None:
                self.settle_cut()
            if self.cut.pending_operation is not None:
                raise Finding("the CUT's job is still paused after it was settled")
            self.call("cut", "free", self.cut.free)
        if self.peer.pending_operation is not None:   # peer_call settles every job
            raise Finding(f"the peer's {self.peer.pending_operation.name} job is still paused")
        self.call("peer", "free", self.peer.free)


    def abandon(self) -> None:
        """After a finding: finish and free what is left, whatever happens."""
        for conn in (self.cut, self.peer):
            try:
                conn.free()   # parked if its job is paused: reap_parked() finishes it
            except Exception:
                pass
        deadline = time.monotonic() + JOB_DEADLINE
        while A.connection_counters()["parked_now"] and time.monotonic() < deadline:
            A.reap_parked()
            time.sleep(0.0002)


def run_one(data: bytes) -> list[str]:
    """Run one script; return its events.  Raises :class:`Finding` on a broken rule."""
    h = harness()
    if not data:
        return []
    reader = Reader(data)
    first = reader.u8()
    config = Config((first >> 1) % len(Config))
    h.engine.clear()
    # a worker slower than the step makes every offloaded operation pause (a
    # fast one may finish before the job would pause): inputs replay alike
    h.engine.set(latency_ms=WORKER_LATENCY_MS)
    h.engine.set_record_pauses(True)
    before = A.connection_counters()
    run = Run(h, config, cut_is_client=bool(first & 1))
    try:
        _play(run, reader)
        run.check_integrity()
        run.finish()
    except Finding as finding:
        run.abandon()   # so that the next input starts clean (a replay goes on)
        trail = "\n  ".join(run.events[-16:])
        raise Finding(f"{finding}\nafter the events (the last 16):\n  {trail}") from finding
    except BaseException:
        run.abandon()
        raise
    finally:
        h.engine.clear()
    events = run.events
    del run
    _check_nothing_left(before)
    return events


def _check_nothing_left(before: dict[str, int]) -> None:
    """Parked connections are reaped (bounded); no job paused, nothing parked or live."""
    deadline = time.monotonic() + JOB_DEADLINE
    now = A.connection_counters()
    while now["parked_now"] > before["parked_now"] or now["live"] > before["live"]:
        if time.monotonic() > deadline:
            break
        A.reap_parked()
        time.sleep(0.0002)
        now = A.connection_counters()
    for key in ("paused_now", "parked_now", "live", "leaked"):
        if now[key] != before[key]:
            raise Finding(f"connection_counters()[{key!r}] is {now[key]} after the input, "
                          f"{before[key]} before: {now}")


def _play(run: Run, reader: Reader) -> None:
    for _ in range(MAX_ACTIONS):
        if not reader.more() or run.cut_dropped:
            return
        action = Action(reader.u8() % len(Action))
        if action is Action.PEER:
            run.peer_turn()
        elif action is Action.CUT:
            op, data = run.natural_op()
            run.cut_step(op, data, run.take_wire())
        elif action is Action.SETTLE:
            run.settle_cut(run.take_wire())
        elif action is Action.OVERWRITE:
            at, blob = run.position(reader.u16()), reader.blob()
            run.wire[at:at + len(blob)] = blob
            del run.wire[MAX_WIRE:]
        elif action is Action.INSERT:
            at = run.position(reader.u16())
            run.grow(reader.blob(), at)
        elif action is Action.DELETE:
            at = run.position(reader.u16())
            del run.wire[at:at + reader.u8()]
        elif action is Action.RECORD:
            kind = reader.u8()
            content_type = RECORD_TYPES[kind] if kind < len(RECORD_TYPES) else kind
            blob = reader.blob()
            run.grow(struct.pack(">BHH", content_type, 0x0303, len(blob)) + blob)
        elif action is Action.CUT_OP:
            op = CutOp(reader.u8() % len(CutOp))
            blob = reader.blob()
            if op is CutOp.WRITE:
                blob = blob or CUT_DATA
            run.cut_step(op, blob, run.take_wire() if op is not CutOp.EOF else b"")
        elif action is Action.FLIP:
            at = run.position(reader.u16())
            bit = reader.u8()
            if at < len(run.wire):
                run.wire[at] ^= 1 << (bit % 8)
        elif action is Action.DROP:
            run.events.append(f"drop while {run.cut.pending_operation}")
            run.cut.free()   # parked if its job is paused
            run.cut_dropped = True
        elif action is Action.HONEST:
            run.honest()
        elif action is Action.PEER_OP:
            which = reader.u8()
            run.peer_op(which, reader.blob())
        elif action is Action.FEED:
            run.attempt("cut", "receive_bytes", partial(run.cut.receive_bytes, run.take_wire()))
        elif action is Action.FAULT:
            FAULTS[reader.u8() % len(FAULTS)](run.engine)
        else:
            run.grow(reader.blob())
        run.check_integrity()


# -- feedback for libFuzzer -----------------------------------------------------------
#: 64 trees of 64 leaves: 4096 outcome buckets (atheris instruments a function in
#: time quadratic in its size, so one tree of 4096 leaves took minutes)
TREE_BITS = 6
TREES = 64


def _decision_tree(bits: int) -> Callable[[int], int]:
    """A function with one branch per value of ``bits`` bits (atheris counts each edge)."""
    lines = ["def leaf(v):"]

    def node(depth: int, prefix: int, indent: str) -> None:
        if depth == bits:
            lines.append(f"{indent}return {prefix}")
            return
        lines.append(f"{indent}if v >> {depth} & 1:")
        node(depth + 1, prefix | 1 << depth, indent + "    ")
        lines.append(f"{indent}else:")
        node(depth + 1, prefix, indent + "    ")

    node(0, 0, "    ")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<outcome-tree>", "exec"), namespace)
    leaf: Callable[[int], int] = namespace["leaf"]
    return leaf


_outcome_trees = [_decision_tree(TREE_BITS) for _ in range(TREES)]


def _feedback(events: list[str]) -> None:
    """Each transition between two events reaches a branch of its own."""
    previous = "start"
    for ev in events:
        bucket = zlib.crc32(f"{previous}|{ev}".encode())
        _outcome_trees[bucket % TREES](bucket // TREES)
        previous = ev


def test_one_input(data: bytes) -> None:
    """The libFuzzer entry point: run the script, turn its outcomes into coverage."""
    _feedback(run_one(data))


def _instrument(atheris: types.ModuleType) -> None:
    """Instrument our package, this file and the outcome tree (already imported)."""
    ours = ("anyio_asyncssl", __name__)
    for obj in gc.get_objects():
        if (isinstance(obj, types.FunctionType)
                and (obj.__module__ or "").startswith(ours)):
            atheris.instrument_func(obj)
    for tree in _outcome_trees:
        atheris.instrument_func(tree)


def replay(paths: list[str]) -> None:
    """``--replay FILE...``: run inputs without atheris, print their events."""
    for path in paths:
        print(f"== {path}")
        for ev in run_one(Path(path).read_bytes()):
            print(f"   {ev}")
    close_harness()


def main(argv: list[str]) -> None:
    if argv[1:2] == ["--replay"]:
        replay(argv[2:])
        return
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        sys.exit("fuzz_connection: atheris is not installed (pip install atheris)")
    _instrument(atheris)
    harness()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
