"""The rules of OpenSSL async mode (docs/architecture.md), each shown on the sans-IO core.

No event loop: connections shuttle bytes in one thread (rule 3 and rule 8 use
threads of their own on purpose).  The test engine makes jobs pause at will:
with offload, the handshake's private-key operation pauses; with
``engine.enable_record_pauses(ctx)``, reads, writes and shutdowns pause too.
"""

from __future__ import annotations

import gc
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Pki, alert_received

import anyio_asyncssl as A
from anyio_asyncssl._ffi import ffi, lib
from anyio_asyncssl.testing import TestEngine, pump, retry_while_async

TIMEOUT = 10.0
Status = A.Status
#: OpenSSL 4.0 fails every call on a connection in its error state before it
#: resumes a paused job (docs/architecture.md, "Where OpenSSL versions differ")
STICKY_FATAL_ERRORS = A.OPENSSL_VERSION_NUMBER >= 0x4000_0000


# -- helpers ---------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_paused_jobs_left(no_jobs_left: None) -> None:
    """Every test must leave no job paused and nothing parked (rule 4)."""


def _pair(server_ctx: A.TLSContext, client_ctx: A.TLSContext, notify: str = "callback",
          hostname: str = "localhost") -> tuple[A.TLSConnection, A.TLSConnection]:
    s = A.TLSConnection(server_ctx, server_side=True, notify=notify)
    c = A.TLSConnection(client_ctx, server_hostname=hostname)
    return c, s


def _wait_until(pred: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``pred`` (no SSL call) until true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.0002)


def _retry(call: Callable[[], Status], *, timeout: float = TIMEOUT) -> list[Status]:
    """Call ``call`` until it stops answering WANT_ASYNC; return every answer."""
    return retry_while_async(call, timeout=timeout)


def _start_server_handshake(c: A.TLSConnection, s: A.TLSConnection) -> Status:
    """ClientHello to the server: with offload its signature job pauses."""
    assert c.do_handshake() is Status.WANT_READ
    return s.do_handshake(c.bytes_to_send())


def _record_pause_pair(pki: Pki, offload: A.Offload, engine: TestEngine,
                       **kw: Any) -> tuple[A.TLSConnection, A.TLSConnection]:
    """A finished handshake whose server pauses in every record cipher call."""
    sctx = pki.server_ctx("rsa", offload=offload)
    engine.enable_record_pauses(sctx)
    c, s = _pair(sctx, pki.client_ctx(), **kw)
    pump(c, s, timeout=TIMEOUT)
    return c, s


def _read_all(conn: A.TLSConnection, n: int, incoming: bytes = b"") -> bytes:
    """Read until ``n`` bytes arrived (retrying WANT_ASYNC)."""
    out = bytearray()
    if incoming:
        conn.receive_bytes(incoming)
    deadline = time.monotonic() + TIMEOUT
    while len(out) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"read {len(out)} of {n} bytes")
        st, chunk = conn.read(65536)
        if st is Status.DONE:
            out += chunk
        elif st is Status.WANT_ASYNC:
            time.sleep(0.0002)
        else:
            raise AssertionError(f"unexpected {st!r} after {len(out)} bytes")
    return bytes(out)


def _write_all(conn: A.TLSConnection, data: bytes) -> None:
    view = memoryview(data)
    sent = 0
    deadline = time.monotonic() + TIMEOUT
    while sent < len(data):
        if time.monotonic() > deadline:
            raise TimeoutError(f"wrote {sent} of {len(data)} bytes")
        st, n = conn.write(view[sent:])
        if st is Status.DONE:
            sent += n
        else:
            assert st is Status.WANT_ASYNC
            time.sleep(0.0002)


# -- rule 1: one operation at a time while a job is paused ------------------------
def test_rule1_other_operations_are_refused_while_a_read_is_paused(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _record_pause_pair(pki, offload, engine)
    _write_all(c, b"first record")
    s.receive_bytes(c.bytes_to_send())

    st, data = s.read(100)
    assert (st, data) == (Status.WANT_ASYNC, b"")
    assert s.pending_operation is A.Operation.READ
    retries = s.stats()["retries"]
    paused = A.connection_counters()["paused_now"]

    # OpenSSL would resume the read's job for any of these and drop their work
    with pytest.raises(A.OperationInProgressError, match="read"):
        s.write(b"this would be silently lost")
    with pytest.raises(A.OperationInProgressError):
        s.do_handshake()
    with pytest.raises(A.OperationInProgressError):
        s.shutdown()
    assert isinstance(A.OperationInProgressError("x"), ssl.SSLError)
    # none of them touched the job: no retry counted, still paused
    assert s.stats()["retries"] == retries
    assert s.pending_operation is A.Operation.READ
    assert A.connection_counters()["paused_now"] == paused
    assert not s.has_bytes_to_send()

    # more ciphertext may arrive meanwhile (only the read BIO is fed)
    _write_all(c, b"second record")
    s.receive_bytes(c.bytes_to_send())

    # the same operation resumes the job and gets the right data; nothing lost
    chunks: list[bytes] = []

    def read() -> Status:
        st, chunk = s.read(100)
        chunks.append(chunk)
        return st

    assert _retry(read)[-1] is Status.DONE
    got = b"".join(chunks)
    # the resumed read returns its record, and every later one that has
    # arrived too (one read decrypts all that is there)
    assert got in (b"first record", b"first recordsecond record")
    assert s.pending_operation is None
    both = b"first recordsecond record"
    assert got + _read_all(s, len(both) - len(got)) == both

    # a write afterwards works and reaches the peer intact
    _write_all(s, b"reply")
    assert c.read(100, s.bytes_to_send()) == (Status.DONE, b"reply")
    assert A.connection_counters()["paused_now"] == paused - 1


def test_rule1_other_operations_are_refused_while_the_handshake_is_paused(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    assert s.pending_operation is A.Operation.HANDSHAKE
    with pytest.raises(A.OperationInProgressError, match="handshake"):
        s.read(100)
    with pytest.raises(A.OperationInProgressError):
        s.write(b"data")
    pump(c, s, timeout=TIMEOUT)
    assert s.handshake_done and s.pending_operation is None


@pytest.mark.parametrize("paused", ["shutdown", "write"])
def test_rule1_key_update_is_refused_while_a_job_is_paused(
        pki: Pki, offload: A.Offload, engine: TestEngine, paused: str) -> None:
    """SSL_key_update() puts the connection back in init under the paused job:
    a resumed SSL_shutdown() then refuses with SHUTDOWN_WHILE_IN_INIT instead
    of resuming its job, which stayed paused for ever (and its connection
    parked for ever).  Found by fuzz/fuzz_connection.py."""
    engine.set(latency_ms=20)
    _, s = _record_pause_pair(pki, offload, engine)
    call: Callable[[], Status]
    if paused == "shutdown":
        call = s.shutdown
    else:
        call = lambda: s.write(b"data")[0]  # noqa: E731
    assert call() is Status.WANT_ASYNC
    with pytest.raises(A.OperationInProgressError, match="key update"):
        s.key_update()
    assert _retry(call)[-1] is Status.DONE
    s.key_update()  # once the job is done, the update is taken
    assert _retry(s.do_handshake)[-1] is Status.DONE


# -- rule 2: the job keeps the first call's buffer --------------------------------
def test_rule2_paused_write_is_pinned_to_its_first_data(pki: Pki, offload: A.Offload,
                                                         engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _record_pause_pair(pki, offload, engine)
    original = b"A" * 1000
    buf = bytearray(original)

    assert s.write(buf) == (Status.WANT_ASYNC, 0)
    assert s.pending_operation is A.Operation.WRITE
    buf[:] = b"B" * 1000  # the caller reuses its buffer: the job must not see it

    with pytest.raises(A.OperationInProgressError, match="different data"):
        s.write(buf)
    with pytest.raises(A.OperationInProgressError):
        s.write(original[:-1])  # shorter
    with pytest.raises(A.OperationInProgressError):
        s.write(b"A" * 999 + b"Z")  # one byte differs
    assert s.pending_operation is A.Operation.WRITE

    # the same data (another object) is the retry, and it completes
    results: list[int] = []

    def write() -> Status:
        st, n = s.write(bytes(original))
        results.append(n)
        return st

    assert _retry(write)[-1] is Status.DONE
    assert results[-1] == len(original)
    assert s.pending_operation is None
    assert _read_all(c, len(original), s.bytes_to_send()) == original
    assert c.read(100) == (Status.WANT_READ, b"")  # exactly those bytes, nothing more


def test_rule2_paused_read_keeps_its_first_size(pki: Pki, offload: A.Offload,
                                                engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _record_pause_pair(pki, offload, engine)
    _write_all(c, b"0123456789abcdefghij")
    s.receive_bytes(c.bytes_to_send())
    assert s.read(10) == (Status.WANT_ASYNC, b"")
    chunks: list[bytes] = []

    def read_more() -> Status:  # a retry asking for more gets the first call's 10
        st, chunk = s.read(65536)
        chunks.append(chunk)
        return st

    assert _retry(read_more)[-1] is Status.DONE
    assert b"".join(chunks) == b"0123456789"
    assert _read_all(s, 10) == b"abcdefghij"


# -- rule 3: a connection belongs to one thread ------------------------------------
def _in_thread(fn: Callable[[], Any]) -> BaseException | None:
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            box[0] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive()
    return box[0]


def test_rule3_use_from_another_thread_is_refused(pki: Pki, offload: A.Offload,
                                                  engine: TestEngine) -> None:
    engine.set(latency_ms=30)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC  # bound to this thread
    retries = s.stats()["retries"]

    # while the job is paused: resuming it elsewhere would crash OpenSSL
    attempts: list[Callable[[], Any]] = [
        s.do_handshake, lambda: s.read(10), lambda: s.write(b"x"),
        lambda: s.receive_bytes(b"x"), s.bytes_to_send, s.receive_eof,
        s.take_unread_input,
    ]
    for attempt in attempts:
        exc = _in_thread(attempt)
        assert isinstance(exc, A.WrongThreadError), exc
        assert isinstance(exc, ssl.SSLError)
    assert s.stats()["retries"] == retries  # the job was never resumed elsewhere
    assert s.pending_operation is A.Operation.HANDSHAKE

    pump(c, s, timeout=TIMEOUT)  # the owner finishes it
    # after the handshake too
    for attempt in (lambda: s.read(10), lambda: s.write(b"x"), s.shutdown):
        assert isinstance(_in_thread(attempt), A.WrongThreadError)
    _write_all(s, b"still fine")
    assert c.read(100, s.bytes_to_send()) == (Status.DONE, b"still fine")


def test_rule3_a_connection_belongs_to_the_thread_of_its_first_use(pki: Pki) -> None:
    c, s = _pair(pki.server_ctx("rsa"), pki.client_ctx())
    out: list[bytes] = []

    def first_use() -> None:
        c.do_handshake()
        out.append(c.bytes_to_send())

    assert _in_thread(first_use) is None
    assert out and out[0]  # the ClientHello
    with pytest.raises(A.WrongThreadError):
        c.do_handshake()
    s.do_handshake(out[0])  # the server is free: first used here


# -- rule 4: a paused job is never freed ------------------------------------------
@pytest.mark.parametrize("how", ["del", "free", "free-then-del"])
def test_rule4_dropping_a_paused_connection_parks_it(pki: Pki, offload: A.Offload,
                                                    engine: TestEngine, how: str) -> None:
    engine.set(latency_ms=100)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    base = A.connection_counters()
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    paused = A.connection_counters()
    assert paused["paused_now"] == base["paused_now"] + 1

    if how == "free":
        s.free()
        with pytest.raises(A.TLSError, match="freed"):
            s.do_handshake()
    elif how == "free-then-del":
        s.free()
        del s
    else:
        del s
    gc.collect()

    now = A.connection_counters()
    assert now["parked"] == base["parked"] + 1  # parked once, not SSL_free'd
    assert now["parked_now"] == base["parked_now"] + 1
    assert now["freed"] == base["freed"]
    assert now["live"] == base["live"]
    assert now["paused_now"] == base["paused_now"] + 1
    # another thread's reap leaves this thread's parked jobs alone (rule 3)
    assert _in_thread(lambda: A.reap_parked() and None) is None
    assert A.connection_counters()["parked_now"] == base["parked_now"] + 1

    _wait_until(lambda: offload.stats().in_flight == 0, "the engine to finish")
    freed = 0
    deadline = time.monotonic() + TIMEOUT
    while freed == 0 and time.monotonic() < deadline:
        freed = A.reap_parked()  # the owner finishes the job, then frees
        time.sleep(0.0005)
    assert freed == 1
    end = A.connection_counters()
    assert end["freed"] == base["freed"] + 1
    assert end["reaped"] == base["reaped"] + 1
    assert end["live"] == base["live"] - 1
    assert end["parked_now"] == base["parked_now"]
    assert end["paused_now"] == base["paused_now"]
    assert A.reap_parked() == 0


@pytest.mark.parametrize("failure", ["transport-eof", "bad-record-mac", "handshake-alert"])
def test_rule4_a_failure_whose_alert_pauses_is_still_a_paused_job(
        pki: Pki, offload: A.Offload, engine: TestEngine, failure: str) -> None:
    """libssl queues the error, then sends a fatal alert whose encryption pauses.

    SSL_get_error() looks at the error queue first and says SSL_ERROR_SSL
    although the job is paused; taken at its word, the connection would be
    freed under its job and the engine would write into freed memory.
    """
    engine.set(latency_ms=20)
    sctx = pki.server_ctx("rsa", offload=offload)
    if failure == "handshake-alert":  # TLS 1.3: the alert goes under handshake keys
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(pki.ca_file)
    engine.enable_record_pauses(sctx)
    c, s = _pair(sctx, pki.client_ctx())
    call: Callable[[], Status]
    if failure == "handshake-alert":
        assert c.do_handshake() is Status.WANT_READ
        s.receive_bytes(c.bytes_to_send())
        assert _retry(s.do_handshake)[-1] is Status.WANT_READ
        assert c.do_handshake(s.bytes_to_send()) is Status.DONE  # sends no certificate
        s.receive_bytes(c.bytes_to_send())
        call = s.do_handshake
    else:
        pump(c, s, timeout=TIMEOUT)
        if failure == "transport-eof":
            s.receive_eof()  # no close_notify
        else:
            _write_all(c, b"hello")
            record = bytearray(c.bytes_to_send())
            record[-1] ^= 1  # the AEAD tag no longer matches
            s.receive_bytes(bytes(record))
        call = lambda: s.read(100)[0]  # noqa: E731
    base = A.connection_counters()

    statuses: list[Status] = []
    deadline = time.monotonic() + TIMEOUT
    with pytest.raises(A.TLSError) as info:
        while time.monotonic() < deadline:
            statuses.append(call())
            assert statuses[-1] is Status.WANT_ASYNC
            time.sleep(0.0005)
    in_flight_at_error = offload.stats().in_flight

    assert statuses and all(st is Status.WANT_ASYNC for st in statuses)
    assert in_flight_at_error == 0  # the failure was reported only once the job ended
    assert s.pending_operation is None
    assert A.connection_counters()["paused_now"] == base["paused_now"]
    assert lib.ERR_peek_error() == 0
    alert = s.bytes_to_send()
    if STICKY_FATAL_ERRORS:
        # OpenSSL 4.0 refuses every call once the connection failed, before it
        # would resume the job: the job is abandoned once its engine is done,
        # and the alert it was encrypting is never sent
        assert alert == b""
    else:
        assert alert  # the fatal alert was encrypted and sent
    if failure == "transport-eof":
        assert isinstance(info.value, A.TLSEOFError)
    elif failure == "bad-record-mac":
        # the error queued inside the job before the pause is the one reported
        # (DECRYPTION_FAILED_OR_BAD_RECORD_MAC; since 3.2's record layer, as the
        # cause of RECORD_LAYER_FAILURE)
        assert any("bad record mac" in reason for _, reason, _ in info.value.errors), info.value
        if alert:
            with pytest.raises(A.TLSError) as peer:
                c.read(100, alert)
            assert alert_received(peer.value) == 20  # bad_record_mac
    else:
        assert info.value.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
        if alert:
            with pytest.raises(A.TLSError) as peer:
                c.read(100, alert)
            assert peer.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    s.free()  # nothing paused: freed at once, not parked
    now = A.connection_counters()
    assert now["freed"] == base["freed"] + 1 and now["parked"] == base["parked"]


def test_rule4_a_connection_without_a_paused_job_is_freed_at_once(pki: Pki) -> None:
    c, s = _pair(pki.server_ctx("rsa"), pki.client_ctx())
    pump(c, s, timeout=TIMEOUT)
    base = A.connection_counters()
    s.free()
    del c
    gc.collect()
    now = A.connection_counters()
    assert now["freed"] == base["freed"] + 2
    assert now["parked"] == base["parked"]
    assert now["live"] == base["live"] - 2


# -- rule 5: wake-ups may be early, duplicated or spurious -------------------------
def _handshake_waiting_for(c: A.TLSConnection, s: A.TLSConnection,
                           wakeups_before_retry: int) -> None:
    """Retry the paused server handshake only after that many wake-ups."""
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    _wait_until(lambda: s.wakeups >= wakeups_before_retry, "the wake-ups")
    pump(c, s, timeout=TIMEOUT)


@pytest.mark.parametrize("fault", ["early", "duplicate"])
def test_rule5_early_and_duplicate_wakeups_are_harmless(pki: Pki, offload: A.Offload,
                                                        engine: TestEngine,
                                                        fault: str) -> None:
    n = 3
    engine.set(latency_ms=10, **{fault: n})  # type: ignore[arg-type]
    sctx = pki.server_ctx("rsa", offload=offload)
    before = offload.stats()
    for _ in range(n):
        c, s = _pair(sctx, pki.client_ctx())
        # early: one wake-up inside the job before the pause, one on completion;
        # duplicate: the completion fires twice (both before the job may return)
        _handshake_waiting_for(c, s, 2)
        st = s.stats()
        assert s.handshake_done and c.handshake_done
        assert st["want_async"] == 1  # one pause ...
        assert s.wakeups == 2 > st["want_async"]  # ... two wake-ups
        if fault == "early":
            assert st["callbacks_in_job"] == 1  # fired on this thread, inside the job
            assert st["callbacks_on_worker"] == 1
        else:
            assert st["callbacks_in_job"] == 0
            assert st["callbacks_on_worker"] == 2
        _write_all(c, b"ok")
        assert _read_all(s, 2, c.bytes_to_send()) == b"ok"
    after = offload.stats()
    assert after.notify_callback - before.notify_callback == 2 * n
    assert engine.faults()[f"{fault}_count"] == 0


@pytest.mark.parametrize("fault", ["early", "duplicate"])
def test_rule5_pump_completes_with_early_and_duplicate_wakeups(pki: Pki, offload: A.Offload,
                                                               engine: TestEngine,
                                                               fault: str) -> None:
    n = 5
    engine.set(latency_ms=2, **{fault: n})  # type: ignore[arg-type]
    sctx = pki.server_ctx("ec", offload=offload)
    for _ in range(n):
        c, s = _pair(sctx, pki.client_ctx())
        pump(c, s, timeout=TIMEOUT)  # retries on every wake-up, early or not
        assert s.handshake_done
        assert s.wakeups == 2
    assert engine.faults()[f"{fault}_count"] == 0


def test_rule5_spurious_resumes_are_harmless(pki: Pki, offload: A.Offload,
                                             engine: TestEngine) -> None:
    engine.set(latency_ms=100)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    spurious = offload.stats().spurious_resumes
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    # retry without any wake-up: the job resumes, sees no result, pauses again
    for _ in range(20):
        assert s.do_handshake() is Status.WANT_ASYNC
    assert s.wakeups == 0
    assert offload.stats().spurious_resumes == spurious + 20
    assert s.stats()["retries"] == 20
    pump(c, s, timeout=TIMEOUT)
    assert s.handshake_done
    _write_all(s, b"intact")
    assert _read_all(c, 6, s.bytes_to_send()) == b"intact"


# -- rule 7: SSL_get_async_status after WANT_ASYNC ---------------------------------
def test_rule7_eagain_then_the_retry_completes(pki: Pki, offload: A.Offload,
                                               engine: TestEngine) -> None:
    engine.set(latency_ms=10, eagain=1)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    before = offload.stats()
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    first = s.async_status
    assert first is A.AsyncStatus.EAGAIN  # engine queue full: reschedule
    assert offload.stats().queue_full == before.queue_full + 1
    assert offload.stats().submitted == before.submitted  # nothing queued yet
    assert s.wakeups == 0  # and no wake-up will come for it
    # the rescheduled retry submits the operation; then a normal pause
    assert s.do_handshake() is Status.WANT_ASYNC
    second = s.async_status
    assert second is A.AsyncStatus.OK
    pump(c, s, timeout=TIMEOUT)
    assert s.handshake_done and s.wakeups == 1
    assert offload.stats().submitted == before.submitted + 1


def test_rule7_real_queue_full_answers_eagain(pki: Pki, offload: A.Offload,
                                              engine: TestEngine) -> None:
    engine.set(latency_ms=100, max_queue=1)
    sctx = pki.server_ctx("rsa", offload=offload)
    pairs = [_pair(sctx, pki.client_ctx()) for _ in range(4)]
    statuses = []
    for c, s in pairs:
        assert _start_server_handshake(c, s) is Status.WANT_ASYNC
        statuses.append(s.async_status)
    # two workers take two operations, the third waits in the queue, the last is refused
    assert A.AsyncStatus.EAGAIN in statuses
    engine.set(max_queue=0)
    for c, s in pairs:
        pump(c, s, timeout=TIMEOUT)
        assert s.handshake_done


@pytest.mark.parametrize("op", ["handshake", "read"])
def test_rule7_err_fails_with_async_engine_error(pki: Pki, offload: A.Offload,
                                                 engine: TestEngine, op: str) -> None:
    engine.set(latency_ms=2)
    if op == "handshake":
        c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
        engine.set(err=1)
        assert _start_server_handshake(c, s) is Status.WANT_ASYNC
        retry: Callable[[], Any] = s.do_handshake
    else:
        c, s = _record_pause_pair(pki, offload, engine)
        _write_all(c, b"doomed")
        s.receive_bytes(c.bytes_to_send())
        engine.set(err=1)
        assert s.read(100)[0] is Status.WANT_ASYNC
        retry = lambda: s.read(100)  # noqa: E731
    assert s.async_status is A.AsyncStatus.ERR
    paused = A.connection_counters()["paused_now"]
    deadline = time.monotonic() + TIMEOUT
    with pytest.raises(A.AsyncEngineError) as info:
        # retrying finishes the job, which fails; on a read the fatal alert's
        # own encryption may pause first (WANT_ASYNC until it is sent)
        while time.monotonic() < deadline:
            assert retry() in (Status.WANT_ASYNC, (Status.WANT_ASYNC, b""))
            time.sleep(0.0005)
    assert isinstance(info.value, ssl.SSLError)
    assert any("ASYNC_STATUS_ERR" in detail for _, _, detail in info.value.errors)
    assert s.pending_operation is None  # the job is over
    assert A.connection_counters()["paused_now"] == paused - 1
    assert lib.ERR_peek_error() == 0  # the queue was read out


@pytest.mark.parametrize("notify", ["fd-only-engine", "no-callback"])
def test_rule7_unsupported_waits_on_the_engine_fd(pki: Pki, offload: A.Offload,
                                                  engine: TestEngine, notify: str) -> None:
    if notify == "fd-only-engine":  # the engine ignores our callback
        engine.set(latency_ms=150, fd_only=True)
        c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx(), "callback")
    else:  # we installed none: the engine falls back to its wait fd
        engine.set(latency_ms=150)
        c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx(), "fd")
    notify_fd = offload.stats().notify_fd
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    assert s.async_status is A.AsyncStatus.UNSUPPORTED
    added, removed = s.changed_async_fds()
    assert len(added) == 1 and removed == []
    assert s.all_async_fds() == added
    fd = added[0]
    assert select.select([fd], [], [], 0)[0] == []  # not done yet

    readable = select.select([fd], [], [], 5.0)[0]
    assert readable == [fd]  # the engine signalled completion on its fd
    assert offload.stats().notify_fd == notify_fd + 1
    assert s.wakeups == 0  # no callback was used
    pump(c, s, timeout=TIMEOUT)
    assert s.handshake_done
    assert select.select([fd], [], [], 0)[0] == []  # the engine cleared its own signal


# -- rule 8: WANT_ASYNC_JOB with a capped job pool ---------------------------------
def test_rule8_capped_job_pool_answers_want_async_job(pki: Pki, offload: A.Offload,
                                                      engine: TestEngine) -> None:
    engine.set(latency_ms=2)
    sctx = pki.server_ctx("rsa", offload=offload)
    cctx = pki.client_ctx()
    report: dict[str, Any] = {}

    def run() -> None:
        A.set_job_pool(4)  # this thread's pool: at most 4 jobs
        pairs = [_pair(sctx, cctx) for _ in range(100)]
        done = [[False, False] for _ in pairs]
        max_paused = 0
        job_waits = 0
        deadline = time.monotonic() + 30
        while not all(cd and sd for cd, sd in done):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(a and b for a, b in done)} of 100 done")
            for (c, s), d in zip(pairs, done, strict=True):  # round robin, one step each
                if not d[0]:
                    d[0] = c.do_handshake(s.bytes_to_send()) is Status.DONE
                else:
                    c.receive_bytes(s.bytes_to_send())
                if not d[1]:
                    st = s.do_handshake(c.bytes_to_send())
                    d[1] = st is Status.DONE
                    job_waits += st is Status.WANT_ASYNC_JOB
                max_paused = max(max_paused, A.connection_counters()["paused_now"])
            time.sleep(0.0005)
        for c, s in pairs:
            c.receive_bytes(s.bytes_to_send())
            _write_all(c, b"hi")
            assert _read_all(s, 2, c.bytes_to_send()) == b"hi"
        report.update(
            max_paused=max_paused, job_waits=job_waits,
            want_async_job=sum(s.stats()["want_async_job"] for _, s in pairs),
            want_async=sum(s.stats()["want_async"] for _, s in pairs),
            done=sum(c.handshake_done and s.handshake_done for c, s in pairs),
            pending=sum(s.pending_operation is not None for _, s in pairs))

    base = A.connection_counters()["paused_now"]
    exc = _in_thread(run)
    if exc is not None:
        raise exc
    assert report["done"] == 100
    assert report["job_waits"] > 0 and report["want_async_job"] == report["job_waits"]
    assert report["want_async"] >= 100  # every server paused for its signature
    assert 1 <= report["max_paused"] - base <= 4  # never more than the pool's 4 jobs
    assert report["pending"] == 0


def test_rule8_job_pool_is_refused_while_jobs_are_paused(pki: Pki, offload: A.Offload,
                                                         engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())

    def run() -> None:
        assert _start_server_handshake(c, s) is Status.WANT_ASYNC
        with pytest.raises(RuntimeError, match="paused"):
            A.set_job_pool(2)
        pump(c, s, timeout=TIMEOUT)
        A.set_job_pool(2)  # fine once nothing is paused

    exc = _in_thread(run)
    if exc is not None:
        raise exc
    assert s.handshake_done


# -- rule 9: shutdown during the handshake -----------------------------------------
def test_rule9_shutdown_before_the_handshake_is_refused(pki: Pki, offload: A.Offload,
                                                        engine: TestEngine) -> None:
    engine.set(latency_ms=20)
    c, s = _pair(pki.server_ctx("rsa", offload=offload), pki.client_ctx())
    for conn in (c, s):  # before anything
        with pytest.raises(A.TLSError) as info:
            conn.shutdown()
        assert info.value.reason == "SHUTDOWN_WHILE_IN_INIT"
        assert isinstance(info.value, ssl.SSLError)
    assert _start_server_handshake(c, s) is Status.WANT_ASYNC
    for conn in (c, s):  # halfway, and with the server's job paused
        with pytest.raises(A.TLSError) as info:
            conn.shutdown()
        assert info.value.reason == "SHUTDOWN_WHILE_IN_INIT"
    assert s.pending_operation is A.Operation.HANDSHAKE  # the job is untouched
    pump(c, s, timeout=TIMEOUT)
    assert _retry(s.shutdown)[-1] is Status.DONE  # and after it, shutdown works
    assert c.read(10, s.bytes_to_send()) == (Status.CLOSED, b"")


# -- rule 11: no stale errors -------------------------------------------------------
def _pollute_error_queue() -> None:
    """Leave an unrelated error on this thread's OpenSSL error queue."""
    bio = lib.BIO_new_mem_buf(b"not a certificate", 17)
    assert lib.PEM_read_bio_X509(bio, ffi.NULL, ffi.NULL, ffi.NULL) == ffi.NULL
    lib.BIO_free(bio)
    assert lib.ERR_peek_error() != 0


@pytest.mark.parametrize("failure", ["verify", "engine-error"])
def test_rule11_a_failed_handshake_leaves_no_stale_errors(pki: Pki, offload: A.Offload,
                                                          engine: TestEngine,
                                                          failure: str) -> None:
    engine.set(latency_ms=2)
    sctx = pki.server_ctx("rsa", offload=offload)
    if failure == "verify":
        c, s = _pair(sctx, pki.client_ctx(), hostname="wrong.invalid")
        with pytest.raises(A.CertificateVerifyError) as info:
            pump(c, s, timeout=TIMEOUT)
        assert info.value.verify_code != 0
        # the server gets the client's alert
        with pytest.raises(A.TLSError):
            s.do_handshake(c.bytes_to_send())
    else:
        c, s = _pair(sctx, pki.client_ctx())
        engine.set(err=1)
        with pytest.raises(A.AsyncEngineError):
            pump(c, s, timeout=TIMEOUT)
    assert lib.ERR_peek_error() == 0  # every error was read into the exception
    assert s.pending_operation is None

    # the next connection is unaffected, even with junk left on the queue
    c2, s2 = _pair(sctx, pki.client_ctx())
    _pollute_error_queue()
    assert c2.do_handshake() is Status.WANT_READ  # not misread as an error
    pump(c2, s2, timeout=TIMEOUT)
    assert s2.handshake_done and c2.handshake_done
    _pollute_error_queue()
    _write_all(c2, b"clean")
    _pollute_error_queue()
    assert _read_all(s2, 5, c2.bytes_to_send()) == b"clean"
