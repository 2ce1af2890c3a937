"""Hostile input: garbage, truncation, resets and corrupted records.

Whatever a peer sends, nothing is lost, leaked or crashed: each bad input ends
its own connection with a clear exception (an ``ssl.SSLError`` subclass from
:mod:`anyio_asyncssl.errors`, or anyio's ``BrokenResourceError`` /
``EndOfStream``), no async job stays paused, no offloaded operation stays in
flight, and the listener goes on serving the next good client.
"""

from __future__ import annotations

import gc
import itertools
import random
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from conftest import Pki, alert_received, recording_handler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream, connect_tcp
from anyio_asyncssl.testing import TestEngine

pytestmark = pytest.mark.anyio

TIMEOUT = 30  # generous: 2 shared cores
CLEAN_ERRORS = (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- leak accounting ---------------------------------------------------------------
def settle(offload: A.Offload, timeout: float = 10.0) -> dict[str, int]:
    """Wait (bounded) for jobs and offloaded operations to finish; return the counters."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        A.reap_parked()
        counters = A.connection_counters()
        quiet = (counters["paused_now"] == 0 and counters["parked_now"] == 0
                 and offload.stats().in_flight == 0)
        if quiet or time.monotonic() > deadline:
            return counters
        time.sleep(0.005)


@pytest.fixture
def no_leaks(offload: A.Offload) -> Iterator[None]:
    """After the test: no paused job, no parked connection, nothing in flight, none live."""
    before = settle(offload)
    yield
    after = settle(offload)
    assert after["paused_now"] == 0, after
    assert after["parked_now"] == 0, after
    assert offload.stats().in_flight == 0, offload.stats()
    assert after["live"] <= before["live"], (before, after)


def check_clean(exc: BaseException) -> None:
    """A bad peer must produce one of the documented exception types, nothing else."""
    assert isinstance(exc, CLEAN_ERRORS), repr(exc)
    if isinstance(exc, ssl.SSLError):
        assert isinstance(exc, A.TLSError), repr(exc)  # ours, with library/reason
        assert str(exc), repr(exc)


# -- our server ---------------------------------------------------------------------
class RecordingListener(AsyncTLSListener):
    """Records handshake errors instead of logging them."""

    handshake_errors: list[BaseException]

    async def handle_handshake_error(  # type: ignore[override]  # needs self
            self, exc: BaseException, stream: Any) -> None:
        await anyio.aclose_forcefully(stream)
        if not isinstance(exc, Exception):
            raise exc
        self.handshake_errors.append(exc)


@asynccontextmanager
async def serving(ctx: A.TLSContext,
                  handler: Callable[[AsyncTLSStream], Awaitable[None]],
                  handler_errors: list[BaseException]) -> AsyncIterator[tuple[int, list[Any]]]:
    """Serve on 127.0.0.1; yield (port, the handshake errors as they are recorded)."""

    guarded = recording_handler(handler, handler_errors)

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(tcp.extra(SocketAttribute.local_port))
    listener = RecordingListener(tcp, ctx, handshake_timeout=TIMEOUT)
    listener.handshake_errors = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, guarded)
            yield port, listener.handshake_errors
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def echo_once(stream: AsyncTLSStream) -> None:
    await stream.send(await stream.receive())


async def good_client(pki: Pki, port: int, message: bytes = b"still serving") -> None:
    with anyio.fail_after(TIMEOUT):
        stream = await connect_tcp("127.0.0.1", port, context=pki.client_ctx(),
                                   hostname="localhost")
        try:
            await stream.send(message)
            assert await stream.receive() == message
        finally:
            await anyio.aclose_forcefully(stream)


async def wait_until(predicate: Callable[[], bool], what: str,
                     timeout: float = TIMEOUT) -> None:
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.002)
    assert predicate(), f"timed out waiting until {what}"


def reset(stream: SocketStream) -> None:
    """Make the next close send a TCP RST instead of a FIN."""
    sock = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def drain(stream: SocketStream, timeout: float = TIMEOUT) -> bytes:
    """Read what the server answers until it closes (bounded)."""
    got = b""
    with anyio.fail_after(timeout):
        try:
            while len(got) < 1 << 20:
                got += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    return got


def client_hello(pki: Pki, max_version: ssl.TLSVersion | None = None) -> bytes:
    """A real ClientHello (our sans-IO client's first flight)."""
    ctx = pki.client_ctx()
    if max_version is not None:
        ctx.maximum_version = max_version
    conn = A.TLSConnection(ctx, server_hostname="localhost")
    assert conn.do_handshake() is A.Status.WANT_READ
    data = conn.bytes_to_send()
    conn.free()
    return data


def record(content_type: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return bytes([content_type, 3, 1]) + n.to_bytes(2, "big") + body


SSLV2_HELLO = (
    # SSLv2 CLIENT-HELLO (2-byte header, MSB set), version 2, three 3-byte ciphers
    bytes([0x80, 0x1F, 0x01, 0x00, 0x02, 0x00, 0x09, 0x00, 0x00, 0x00, 0x10])
    + bytes([0x07, 0x00, 0xC0, 0x05, 0x00, 0x80, 0x03, 0x00, 0x80])
    + bytes(range(16))
)


def garbage_inputs(pki: Pki) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes sent instead of a handshake, how the client ends: eof / reset)."""
    hello = client_hello(pki)
    rng = random.Random(1234)
    return {
        "random_bytes": (bytes(rng.randrange(256) for _ in range(600)), "eof"),
        "http_request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "eof"),
        "huge_length_header": (record(22, b"\x01" * 64, length=0xFFFF), "eof"),
        "oversized_record": (record(22, b"\x01" * 300, length=2**14 + 2049), "eof"),
        "truncated_client_hello": (hello[: len(hello) // 2], "eof"),
        "client_hello_header_only": (hello[:5], "eof"),
        "truncated_client_hello_reset": (hello[: len(hello) // 2], "reset"),
        "sslv2_hello": (SSLV2_HELLO, "eof"),
        "empty_then_eof": (b"", "eof"),
        "alert_instead_of_hello": (record(21, b"\x02\x28"), "eof"),
        "application_data_first": (record(23, b"\x00" * 40), "eof"),
        "client_hello_with_bad_length": (hello[:5] + b"\x01\xff\xff\xff" + hello[9:], "eof"),
    }


GARBAGE_NAMES = [
    "random_bytes", "http_request", "huge_length_header", "oversized_record",
    "truncated_client_hello", "client_hello_header_only", "truncated_client_hello_reset",
    "sslv2_hello", "empty_then_eof", "alert_instead_of_hello", "application_data_first",
    "client_hello_with_bad_length",
]

# Where every supported OpenSSL names the same reason (the stdlib's name for its
# code).  An oversized record is PACKET_LENGTH_TOO_LONG before 3.2 and
# RECORD_LAYER_FAILURE (caused by "data length too long") after its new record
# layer: there the RFC's requirement, the record_overflow alert, is what is checked.
EXPECTED_REASON = {
    "http_request": "HTTP_REQUEST",
}


# OpenSSL answers no alert when the bytes are not TLS records at all
SILENT = {"random_bytes", "http_request"}
# an SSLv2-format ClientHello: OpenSSL 3.x parses it and answers with an alert;
# 4.0 no longer reads that format and takes it for non-TLS bytes (silence).
# RFC 8446 D.5 leaves accepting it to the server: either answer is right
SILENT_OR_ALERT = {"sslv2_hello"}
EXPECTED_ALERT = {  # RFC 8446 6.2 alert descriptions
    "huge_length_header": 22,  # record_overflow
    "oversized_record": 22,
    "alert_instead_of_hello": 10,  # unexpected_message
    "application_data_first": 10,
    "truncated_client_hello": 50,  # decode_error
}


@pytest.mark.parametrize("name", GARBAGE_NAMES)
async def test_garbage_instead_of_client_hello_fails_that_connection_only(
        pki: Pki, offload: A.Offload, no_leaks: None, name: str) -> None:
    payload, ending = garbage_inputs(pki)[name]
    handler_errors: list[BaseException] = []
    async with serving(pki.server_ctx("rsa", offload=offload), echo_once,
                       handler_errors) as (port, errors):
        await good_client(pki, port, b"before")
        raw = await anyio.connect_tcp("127.0.0.1", port)
        try:
            if payload:
                await raw.send(payload)
            if ending == "eof":
                await raw.send_eof()
                answer = await drain(raw)
                if name in SILENT or (name in SILENT_OR_ALERT and answer == b""):
                    assert answer == b"", answer[:16]
                else:  # the server told the client why: a fatal alert
                    assert answer[:3] in (b"\x15\x03\x01", b"\x15\x03\x03"), answer[:16]
                    assert answer[3:6] == b"\x00\x02\x02", answer[:16]
                    if name in EXPECTED_ALERT:
                        assert answer[6] == EXPECTED_ALERT[name], answer[:16]
            else:
                await anyio.sleep(0.05)  # let the server read the partial hello
                reset(raw)
        finally:
            await raw.aclose()
        await wait_until(lambda: len(errors) >= 1, "the handshake failed")
        await good_client(pki, port, b"after")
    (exc,) = errors
    check_clean(exc)
    assert not isinstance(exc, TimeoutError)
    if name in EXPECTED_REASON:
        assert isinstance(exc, A.TLSError) and exc.reason == EXPECTED_REASON[name], repr(exc)
    assert not handler_errors


@pytest.mark.parametrize("ending", ["reset", "eof", "garbage"])
async def test_client_hello_then_trouble_while_the_handshake_is_paused(
        pki: Pki, offload: A.Offload, engine: TestEngine, no_leaks: None,
        ending: str) -> None:
    """The server's handshake is paused in the engine when the client misbehaves."""
    engine.set(latency_ms=250)
    hello = client_hello(pki)
    handler_errors: list[BaseException] = []
    before = offload.stats()
    async with serving(pki.server_ctx("rsa", offload=offload), echo_once,
                       handler_errors) as (port, errors):
        raw = await anyio.connect_tcp("127.0.0.1", port)
        try:
            await raw.send(hello)
            await wait_until(lambda: offload.stats().submitted > before.submitted,
                             "the server's signature was offloaded")
            assert A.connection_counters()["paused_now"] >= 1  # still signing
            if ending == "garbage":
                await raw.send(record(22, b"\xde\xad\xbe\xef" * 20))
                await raw.send(bytes(random.Random(5).randrange(256) for _ in range(300)))
            if ending == "reset":
                reset(raw)
            else:
                await raw.send_eof()
        finally:
            await raw.aclose()
        await wait_until(lambda: len(errors) >= 1, "the handshake failed")
        engine.clear()
        await good_client(pki, port)
    (exc,) = errors
    check_clean(exc)
    assert not handler_errors
    after = offload.stats()
    assert after.sign_ops > before.sign_ops and after.in_flight == 0


# -- corrupted records after a good handshake ---------------------------------------
async def sans_io_handshake(raw: SocketStream, conn: A.TLSConnection) -> None:
    """Run a sans-IO client handshake over a raw socket (the client has no offload)."""
    incoming = b""
    with anyio.fail_after(TIMEOUT):
        while True:
            status = conn.do_handshake(incoming)
            out = conn.bytes_to_send()
            if out:
                await raw.send(out)
            if status is A.Status.DONE:
                return
            assert status is A.Status.WANT_READ, status
            incoming = await raw.receive()


@pytest.mark.parametrize("where", ["tag", "first_ciphertext_byte", "content_type"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_corrupted_ciphertext_fails_the_read_and_the_server_goes_on(
        pki: Pki, offload: A.Offload, no_leaks: None, version: str, where: str) -> None:
    cctx = pki.client_ctx()
    cctx.maximum_version = (ssl.TLSVersion.TLSv1_2 if version == "1.2"
                            else ssl.TLSVersion.TLSv1_3)
    conn = A.TLSConnection(cctx, server_hostname="localhost")
    try:
        await corrupt_one_record(pki, offload, conn, version, where)
    finally:
        conn.free()


async def corrupt_one_record(pki: Pki, offload: A.Offload, conn: A.TLSConnection,
                             version: str, where: str) -> None:
    """``conn`` handshakes over a raw socket, then sends one record with a byte flipped.

    The server's read fails with bad_record_mac (and tells the client so with
    an alert), the altered plaintext is never delivered, the server goes on.
    """
    received: list[bytes] = []
    handler_errors: list[BaseException] = []

    async def handler(stream: AsyncTLSStream) -> None:
        data = await stream.receive()
        received.append(data)
        await stream.send(data)

    async with serving(pki.server_ctx("rsa", offload=offload), handler,
                       handler_errors) as (port, errors):
        raw = await anyio.connect_tcp("127.0.0.1", port)
        try:
            await sans_io_handshake(raw, conn)
            assert conn.version() == f"TLSv{version}"
            status, n = conn.write(b"a secret the server must never see altered")
            assert status is A.Status.DONE and n > 0
            rec = bytearray(conn.bytes_to_send())
            assert rec[0] == 23 and len(rec) > 5 + 16
            index = {"tag": len(rec) - 1, "first_ciphertext_byte": 5, "content_type": 0}[where]
            rec[index] ^= 0x01 if where != "content_type" else 0x17 ^ 0x16
            await raw.send(bytes(rec))
            answer = await drain(raw)
        finally:
            await raw.aclose()
        await wait_until(lambda: len(handler_errors) >= 1, "the server's read failed")
        await good_client(pki, port)
    assert not errors  # the handshake itself was fine
    assert received == [b"still serving"]  # the altered record was never delivered
    (exc,) = handler_errors
    check_clean(exc)
    if where != "content_type":
        # (the reason is OpenSSL's: DECRYPTION_FAILED_OR_BAD_RECORD_MAC before 3.2,
        # RECORD_LAYER_FAILURE since; what RFC 8446 5.2 requires is the alert)
        assert isinstance(exc, A.TLSError) and not isinstance(exc, A.TLSEOFError), repr(exc)
        # the server said why, with the bad_record_mac alert the RFC requires
        with pytest.raises(A.TLSError) as alert:
            for _ in range(10):  # session tickets (TLS 1.3) come first
                status, _data = conn.read(incoming=answer)
                answer = b""
                assert status is A.Status.DONE
        assert alert_received(alert.value) == 20, repr(alert.value)  # bad_record_mac


# -- hostile servers against our client ---------------------------------------------
def server_flight(pki: Pki, hello: bytes, max_version: ssl.TLSVersion) -> bytes:
    """A real server's first flight in answer to ``hello`` (no offload)."""
    ctx = pki.server_ctx("rsa")
    ctx.maximum_version = max_version
    conn = A.TLSConnection(ctx, server_side=True)
    assert conn.do_handshake(hello) is A.Status.WANT_READ
    data = conn.bytes_to_send()
    conn.free()
    return data


HOSTILE_SERVER_ANSWERS = ["random_bytes", "http_response", "huge_length_header",
                          "truncated_server_flight", "corrupted_server_flight",
                          "truncated_tls12_flight", "corrupted_tls12_flight",
                          "server_hello_then_reset", "nothing"]


async def read_client_hello(stream: SocketStream) -> bytes:
    buf = b""
    with anyio.fail_after(TIMEOUT):
        while len(buf) < 5 or len(buf) < 5 + int.from_bytes(buf[3:5], "big"):
            buf += await stream.receive()
    return buf


@pytest.mark.parametrize("answer", HOSTILE_SERVER_ANSWERS)
async def test_hostile_server_answers_fail_our_client_cleanly(
        pki: Pki, no_leaks: None, answer: str) -> None:
    rng = random.Random(99)
    # a real server's flight for the client's real hello, then spoiled; with
    # TLS 1.2 the certificate and key exchange are in clear and get parsed
    version = ssl.TLSVersion.TLSv1_2 if "tls12" in answer else ssl.TLSVersion.TLSv1_3
    cctx = pki.client_ctx()
    cctx.maximum_version = version

    async def hostile(stream: SocketStream) -> None:
        async with stream:
            hello = await read_client_hello(stream)
            if answer == "random_bytes":
                await stream.send(bytes(rng.randrange(256) for _ in range(700)))
            elif answer == "http_response":
                await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            elif answer == "huge_length_header":
                await stream.send(record(22, b"\x02" * 40, length=0xFFFF))
            else:
                flight = server_flight(pki, hello, version)
                if answer.startswith("truncated"):
                    await stream.send(flight[: len(flight) * 2 // 3])
                elif answer.startswith("corrupted"):
                    corrupt = bytearray(flight)
                    corrupt[len(corrupt) // 2] ^= 0xFF
                    await stream.send(bytes(corrupt))
                elif answer == "server_hello_then_reset":
                    await stream.send(flight[:60])
                    reset(stream)
                    return
            await stream.send_eof()
            await drain(stream)  # until the client hangs up

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(tcp.extra(SocketAttribute.local_port))
    async with tcp, anyio.create_task_group() as tg:
        tg.start_soon(tcp.serve, hostile)
        for _ in range(2):  # and the client side is reusable afterwards
            with anyio.fail_after(TIMEOUT), pytest.raises(CLEAN_ERRORS) as info:
                await connect_tcp("127.0.0.1", port, context=cctx, hostname="localhost")
            check_clean(info.value)
        tg.cancel_scope.cancel()


# -- fuzzing the sans-IO core -------------------------------------------------------
@st.composite
def hostile_bytes(draw: st.DrawFn, valid: list[bytes]) -> tuple[bytes, list[int]]:
    """Hostile input and the cut points that split it into chunks.

    Arbitrary bytes; well-framed records with arbitrary bodies; a valid flight
    with a few bytes flipped, truncated, or followed by arbitrary bytes.
    """
    kind = draw(st.sampled_from(["random", "records", "mutated", "truncated",
                                 "valid_then_random"]))
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=3000))
    elif kind == "records":
        bodies = draw(st.lists(st.tuples(st.sampled_from([20, 21, 22, 23]),
                                         st.binary(max_size=400)), min_size=1, max_size=4))
        data = b"".join(record(t, body) for t, body in bodies)
    else:
        base = bytearray(draw(st.sampled_from(valid)))
        if kind == "mutated":
            for _ in range(draw(st.integers(1, 6))):
                base[draw(st.integers(0, len(base) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "truncated":
            del base[draw(st.integers(0, len(base) - 1)):]
        tail_min = 1 if kind == "valid_then_random" else 0
        data = bytes(base) + draw(st.binary(min_size=tail_min, max_size=600))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return data, cuts


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def feed_handshake(conn: A.TLSConnection, data: bytes, cuts: list[int],
                   deadline_s: float = 10.0) -> None:
    """Feed chunks to do_handshake; only Status values or TLSErrors may come out.

    A chunk that arrives while the handshake is paused in the engine is fed
    into the paused job's retry, as a driver would when data comes in.
    """
    deadline = time.monotonic() + deadline_s
    try:
        for chunk in chunks(data, cuts):
            status = conn.do_handshake(chunk)
            assert isinstance(status, A.Status)
        conn.receive_eof()
        status = conn.do_handshake()
        while status in (A.Status.WANT_ASYNC, A.Status.WANT_ASYNC_JOB):
            assert time.monotonic() < deadline, "the engine never completed"
            time.sleep(0.0005)
            status = conn.do_handshake()
        # all input consumed and the transport ended: it cannot have succeeded
        raise AssertionError(f"handshake ended with {status!r} on hostile input")
    except ssl.SSLError as exc:
        assert isinstance(exc, A.TLSError), repr(exc)
        assert not isinstance(exc, A.OperationInProgressError), repr(exc)
    assert conn.pending_operation is None  # no job left paused
    conn.free()


FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("with_offload", [False, True], ids=["plain", "offload_paused"])
def test_fuzz_server_handshake_input(pki: Pki, offload: A.Offload, engine: TestEngine,
                                     with_offload: bool) -> None:
    hellos = [client_hello(pki), client_hello(pki, ssl.TLSVersion.TLSv1_2)]
    ctx = pki.server_ctx("rsa", offload=offload if with_offload else None)
    if with_offload:
        engine.set(latency_ms=3)  # chunks after the hello arrive while the job is paused
    before = offload.stats()

    @FUZZ
    @given(hostile_bytes(hellos))
    def run(case: tuple[bytes, list[int]]) -> None:
        feed_handshake(A.TLSConnection(ctx, server_side=True), *case)

    try:
        run()
    finally:
        engine.clear()
    after = settle(offload)
    assert after["paused_now"] == 0 and after["parked_now"] == 0, after
    stats = offload.stats()
    assert stats.in_flight == 0
    if with_offload:  # valid hellos reached the offloaded signature, and it paused
        assert stats.sign_ops > before.sign_ops and stats.pauses > before.pauses


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_fuzz_client_handshake_input(pki: Pki, offload: A.Offload, version: str) -> None:
    max_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    flights = [server_flight(pki, client_hello(pki, max_version), max_version)]
    ctx = pki.client_ctx()
    ctx.maximum_version = max_version

    @FUZZ
    @given(hostile_bytes(flights))
    def run(case: tuple[bytes, list[int]]) -> None:
        conn = A.TLSConnection(ctx, server_hostname="localhost")
        assert conn.do_handshake() is A.Status.WANT_READ  # the ClientHello is out
        conn.bytes_to_send()
        feed_handshake(conn, *case)

    run()
    after = settle(offload)
    assert after["paused_now"] == 0 and after["parked_now"] == 0, after
