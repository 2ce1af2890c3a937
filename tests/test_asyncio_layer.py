"""asyncio's TLS behaviours on our layer (anyio_asyncssl.asyncio), against asyncio's own.

The peers are asyncio's SSLProtocol on the stdlib's ssl (an implementation we
did not write), raw sockets for hostile peers, and our own layer; the test
engine pauses the handshake (offloaded signatures) and, with record pauses,
every read, write and shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl import asyncio as AA
from anyio_asyncssl.asyncio_tls import TLSTransport
from anyio_asyncssl.testing import TestEngine

TIMEOUT = 30
V12 = ssl.TLSVersion.TLSv1_2
V13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="pip install uvloop")
    return str(request.param)


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop_kind: str = "asyncio") -> Any:
    """Run ``main()`` on a fresh loop of ours (bounded), then close the loop."""
    loop = AA.new_event_loop(uvloop=loop_kind == "uvloop")
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), TIMEOUT))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def server_ctx(pki: Pki, offload: A.Offload | None = None,
               version: ssl.TLSVersion | None = None) -> A.TLSContext:
    ctx = pki.server_ctx("rsa", offload=offload)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def stdlib_server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.rsa_file)
    return ctx


def stdlib_client_ctx(pki: Pki, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   payload: bytes) -> bytes:
    """Send ``payload`` while reading as much back."""
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(payload):
            data = await reader.read(65536)
            assert data, "EOF before the echo was complete"
            got.extend(data)

    task = asyncio.ensure_future(read_all())
    writer.write(payload)
    await writer.drain()
    await task
    return bytes(got)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


# == echo both ways ===============================================================================
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
def test_our_server_echoes_for_asyncios_client(pki: Pki, engine: TestEngine,
                                               offload: A.Offload, loop_kind: str,
                                               version: ssl.TLSVersion) -> None:
    engine.set(latency_ms=2)   # the signature really pauses the handshake
    sctx = server_ctx(pki, offload)
    payload = os.urandom(3 << 20)

    async def main() -> None:
        before = offload.stats().sign_ops
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=sctx)
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(server), ssl=stdlib_client_ctx(pki, version),
                server_hostname="localhost")
            assert writer.get_extra_info("ssl_object").version() == {V12: "TLSv1.2",
                                                                     V13: "TLSv1.3"}[version]
            assert await exchange(reader, writer, payload) == payload
            writer.close()
            await writer.wait_closed()
        assert offload.stats().sign_ops > before

    run(main, loop_kind)


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
def test_our_client_echoes_with_asyncios_server(pki: Pki, offload: A.Offload, loop_kind: str,
                                                version: ssl.TLSVersion) -> None:
    payload = os.urandom(3 << 20)
    cctx = pki.client_ctx(offload)
    cctx.maximum_version = version

    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0,
                                            ssl=stdlib_server_ctx(pki))
        async with server:
            reader, writer = await AA.open_connection("127.0.0.1", port_of(server), ssl=cctx,
                                                      server_hostname="localhost")
            transport = writer.transport
            assert isinstance(transport, TLSTransport)
            assert transport.get_extra_info("sslcontext") is cctx
            assert transport.get_extra_info("peercert")["subjectAltName"][0] == (
                "DNS", "localhost")
            assert transport.get_extra_info("cipher")[1] == {V12: "TLSv1.2",
                                                             V13: "TLSv1.3"}[version]
            assert transport.get_extra_info("compression") is None
            assert transport.get_extra_info("socket").fileno() >= 0
            assert transport.get_extra_info("peername")[1] == port_of(server)
            assert await exchange(reader, writer, payload) == payload
            writer.close()
            await writer.wait_closed()

    run(main, loop_kind)


def test_a_stdlib_context_gets_asyncios_own_tls_on_our_loop(pki: Pki) -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0,
                                            ssl=stdlib_server_ctx(pki))
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(server), ssl=stdlib_client_ctx(pki),
                server_hostname="localhost")
            assert not isinstance(writer.transport, TLSTransport)
            assert isinstance(writer.get_extra_info("ssl_object"), ssl.SSLObject)
            assert await exchange(reader, writer, b"stdlib") == b"stdlib"
            writer.close()
            await writer.wait_closed()

    run(main)


def test_module_functions_work_on_a_stock_asyncio_loop(pki: Pki) -> None:
    async def main() -> None:
        server = await AA.start_server(echo_handler, "127.0.0.1", 0, ssl=server_ctx(pki))
        async with server:
            reader, writer = await AA.open_connection("127.0.0.1", port_of(server),
                                                      ssl=pki.client_ctx(),
                                                      server_hostname="localhost")
            assert await exchange(reader, writer, b"stock loop") == b"stock loop"
            writer.close()
            await writer.wait_closed()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_a_stdlib_context_passed_to_our_functions_is_a_type_error(pki: Pki) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"not an ssl\.SSLContext"):
            await AA.create_connection(asyncio.Protocol, "127.0.0.1", 1,
                                       ssl=stdlib_client_ctx(pki))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"not an ssl\.SSLContext"):
            await AA.create_server(asyncio.Protocol, "127.0.0.1", 0,
                                   ssl=stdlib_server_ctx(pki))  # type: ignore[arg-type]

    run(main)


# == start_tls ===========================================================================
@pytest.mark.parametrize("ours", ["client", "server"])
def test_start_tls_upgrades_a_plain_connection(pki: Pki, offload: A.Offload, ours: str) -> None:
    """STARTTLS: plain lines first, then TLS on the same connection, against asyncio's."""
    server_context: Any = server_ctx(pki, offload) if ours == "server" else stdlib_server_ctx(pki)
    client_context: Any = pki.client_ctx() if ours == "client" else stdlib_client_ctx(pki)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_context)
        line = await reader.readline()
        writer.write(b"secure " + line)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"STARTTLS\n")
            await writer.drain()
            assert await reader.readline() == b"GO\n"
            await writer.start_tls(client_context, server_hostname="localhost")
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            writer.write(b"hello\n")
            await writer.drain()
            assert await reader.readline() == b"secure hello\n"
            writer.close()
            await writer.wait_closed()

    run(main)


def test_tls_in_tls_with_start_tls_on_our_transport(pki: Pki) -> None:
    """start_tls on one of our TLS transports (an HTTPS proxy's tunnel)."""
    # (typeshed types start_tls's context an ssl.SSLContext; our loop's takes a TLSContext)
    async def inner_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await writer.start_tls(server_ctx(pki))  # type: ignore[arg-type]
        await echo_handler(reader, writer)

    async def main() -> None:
        server = await AA.start_server(inner_echo, "127.0.0.1", 0, ssl=server_ctx(pki))
        async with server:
            reader, writer = await AA.open_connection("127.0.0.1", port_of(server),
                                                      ssl=pki.client_ctx(),
                                                      server_hostname="localhost")
            outer = writer.transport
            await writer.start_tls(pki.client_ctx(),  # type: ignore[arg-type]
                                   server_hostname="localhost")
            assert writer.transport is not outer
            assert await exchange(reader, writer, b"inside" * 10000) == b"inside" * 10000
            writer.close()
            await writer.wait_closed()

    run(main)


# == flow control =================================================================================
class SlowReader(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None
        self.max_read_buffer = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.max_read_buffer = max(self.max_read_buffer,
                                   self.transport.get_read_buffer_size())

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Flooder(asyncio.Protocol):
    """Writes ``total`` bytes, respecting pause_writing; records the largest buffer."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.paused = 0
        self.max_buffer = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.task = asyncio.ensure_future(self.flood())

    async def flood(self) -> None:
        chunk = b"z" * 65536
        while self.sent < self.total:
            await self.can_write.wait()
            self.transport.write(chunk)
            self.sent += len(chunk)
            self.max_buffer = max(self.max_buffer, self.transport.get_write_buffer_size())
        self.transport.close()

    def pause_writing(self) -> None:
        self.paused += 1
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


def test_flow_control_a_slow_reader_bounds_both_sides_buffers(pki: Pki) -> None:
    total = 48 << 20
    flooders: list[Flooder] = []

    def make_flooder() -> Flooder:
        flooders.append(Flooder(total))
        return flooders[-1]

    async def main() -> None:
        server = await AA.create_server(make_flooder, "127.0.0.1", 0, ssl=server_ctx(pki))
        async with server:
            _, reader = await AA.create_connection(SlowReader, "127.0.0.1", port_of(server),
                                                   ssl=pki.client_ctx(),
                                                   server_hostname="localhost")
            assert isinstance(reader, SlowReader)
            tls = reader.transport
            tls.set_read_buffer_limits(high=128 * 1024)
            tls.pause_reading()   # the application stops reading
            flooder = flooders[0]
            await asyncio.sleep(0.5)
            stuck_at = flooder.sent
            await asyncio.sleep(0.3)
            assert flooder.sent == stuck_at < total, "the writer was not held back"
            assert flooder.paused > 0, "the writer was never paused"
            _low, high = flooder.transport.get_write_buffer_limits()
            assert flooder.max_buffer <= high + 65536
            # the reader's side: ciphertext held while paused stays bounded
            assert tls.get_read_buffer_size() <= 128 * 1024 + 256 * 1024
            tls.resume_reading()
            await asyncio.wait_for(reader.done, TIMEOUT)
            assert reader.received == total

    run(main)


# == closing ======================================================================================
class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.events: list[str] = []
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data.extend(data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def test_close_sends_close_notify_and_the_peer_sees_a_clean_eof(pki: Pki) -> None:
    seen: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await seen.put(await reader.read())   # until EOF: raises on a ragged one
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=stdlib_server_ctx(pki))
        async with server:
            transport, protocol = await AA.create_connection(
                Recorder, "127.0.0.1", port_of(server), ssl=pki.client_ctx(),
                server_hostname="localhost")
            transport.write(b"last words")
            transport.close()
            assert transport.is_closing()
            assert await asyncio.wait_for(seen.get(), TIMEOUT) == b"last words"
            assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None  # type: ignore[attr-defined]
            assert protocol.events == ["made", "lost"]  # type: ignore[attr-defined]

    run(main)


def test_the_peers_close_notify_is_eof_received_then_connection_lost(pki: Pki) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()   # asyncio's SSLProtocol: close_notify

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=stdlib_server_ctx(pki))
        async with server:
            transport, protocol = await AA.create_connection(
                Recorder, "127.0.0.1", port_of(server), ssl=pki.client_ctx(),
                server_hostname="localhost")
            rec: Any = protocol
            assert await asyncio.wait_for(rec.lost, TIMEOUT) is None
            assert rec.events == ["made", "eof", "lost"]
            assert bytes(rec.data) == b"bye"
            assert transport.is_closing()

    run(main)


def test_write_eof_on_tls13_is_a_half_close(pki: Pki) -> None:
    """Beyond asyncio: close_notify one way, data still flows the other."""
    class HalfCloser(Recorder):
        def eof_received(self) -> bool:
            self.events.append("eof")
            self.transport.write(b"reply after your eof")
            self.transport.close()
            return True

    async def main() -> None:
        server = await AA.create_server(HalfCloser, "127.0.0.1", 0, ssl=server_ctx(pki))
        async with server:
            transport, protocol = await AA.create_connection(
                Recorder, "127.0.0.1", port_of(server), ssl=pki.client_ctx(),
                server_hostname="localhost")
            rec: Any = protocol
            assert transport.can_write_eof()
            transport.write(b"request")
            transport.write_eof()
            assert await asyncio.wait_for(rec.lost, TIMEOUT) is None
            assert bytes(rec.data) == b"reply after your eof"
            assert rec.events == ["made", "eof", "lost"]

    run(main)


def test_write_eof_on_tls12_is_refused(pki: Pki) -> None:
    async def main() -> None:
        server = await AA.create_server(Recorder, "127.0.0.1", 0,
                                        ssl=server_ctx(pki, version=V12))
        async with server:
            transport, _ = await AA.create_connection(
                Recorder, "127.0.0.1", port_of(server), ssl=pki.client_ctx(),
                server_hostname="localhost")
            assert not transport.can_write_eof()
            with pytest.raises(NotImplementedError):
                transport.write_eof()
            transport.abort()

    run(main)


# == failures =====================================================================================
def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    return s


def test_handshake_timeout_is_connection_aborted(pki: Pki) -> None:
    async def main() -> None:
        with listening_socket() as silent:   # accepts (backlog), never answers
            port = silent.getsockname()[1]
            with pytest.raises(ConnectionAbortedError, match=r"longer than 0\.3 seconds"):
                await AA.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                           ssl=pki.client_ctx(), server_hostname="localhost",
                                           ssl_handshake_timeout=0.3)

    run(main)


def test_server_closes_a_client_that_never_finishes_its_hello(pki: Pki) -> None:
    made: list[Any] = []

    async def main() -> None:
        def counted_recorder() -> Recorder:
            made.append(1)
            return Recorder()

        server = await AA.create_server(counted_recorder, "127.0.0.1", 0,
                                        ssl=server_ctx(pki), ssl_handshake_timeout=0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a hello
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""   # closed by us
            writer.close()

    run(main)
    assert made == [1]   # the factory ran, the protocol never got connection_made


@pytest.mark.parametrize("when", ["before-hello", "after-hello"])
def test_a_server_that_drops_the_handshake_is_connection_reset(pki: Pki, when: str) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if when == "after-hello":
            await reader.read(1)
        writer.transport.abort()

    async def main() -> None:
        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        async with server:
            with pytest.raises((ConnectionResetError, ssl.SSLError)):
                await AA.create_connection(asyncio.Protocol, "127.0.0.1", port_of(server),
                                           ssl=pki.client_ctx(), server_hostname="localhost")

    run(main)


def test_a_verification_failure_raises_our_tls_error(pki: Pki) -> None:
    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0,
                                            ssl=stdlib_server_ctx(pki))
        async with server:
            with pytest.raises(A.CertificateVerifyError):
                await AA.create_connection(asyncio.Protocol, "127.0.0.1", port_of(server),
                                           ssl=pki.client_ctx(), server_hostname="wrong.test")

    run(main)


def test_a_peer_that_disconnects_mid_record_ends_the_connection(pki: Pki) -> None:
    """Half a record, then the TCP connection goes: no data, connection_lost, no crash."""
    sctx = stdlib_server_ctx(pki)

    async def main() -> None:
        with listening_socket() as lsock:
            port = lsock.getsockname()[1]
            loop = asyncio.get_running_loop()

            async def peer() -> None:
                conn, _ = await loop.sock_accept(lsock)
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = sctx.wrap_bio(incoming, outgoing, server_side=True)
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        await loop.sock_sendall(conn, outgoing.read())
                        incoming.write(await loop.sock_recv(conn, 65536))
                await loop.sock_sendall(conn, outgoing.read())
                tls.write(b"q" * 5000)
                record = outgoing.read()
                await loop.sock_sendall(conn, record[: len(record) // 2])
                await asyncio.sleep(0.05)
                conn.close()

            task = asyncio.ensure_future(peer())
            _, protocol = await AA.create_connection(
                Recorder, "127.0.0.1", port, ssl=pki.client_ctx(), server_hostname="localhost")
            rec: Any = protocol
            await asyncio.wait_for(rec.lost, TIMEOUT)
            await task
            assert bytes(rec.data) == b""
            assert rec.events[0] == "made" and rec.events[-1] == "lost"

    run(main)


# == cancellation =================================================================================
@pytest.mark.parametrize("what", ["create_connection", "start_tls"])
def test_cancelling_the_task_that_awaits_the_handshake(pki: Pki, engine: TestEngine,
                                                       offload: A.Offload, what: str,
                                                       no_jobs_left: None) -> None:
    """Cancelled while the server's signature (or the client's) is paused on the engine."""
    engine.set(latency_ms=200)
    cctx_offloaded = A.create_default_context(cafile=pki.ca_file, offload=offload)
    cctx_offloaded.load_cert_chain(pki.client_file)   # a client key: its signature pauses
    sctx = server_ctx(pki, offload)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(cafile=pki.ca_file)

    async def main() -> None:
        before = A.connection_counters()
        server = await AA.create_server(Recorder, "127.0.0.1", 0, ssl=sctx)
        async with server:
            for _ in range(3):
                if what == "create_connection":
                    task = asyncio.ensure_future(AA.create_connection(
                        Recorder, "127.0.0.1", port_of(server), ssl=cctx_offloaded,
                        server_hostname="localhost"))
                else:
                    async def upgrade() -> Any:
                        loop = asyncio.get_running_loop()
                        transport, protocol = await loop.create_connection(
                            Recorder, "127.0.0.1", port_of(server))
                        # typeshed: an ssl.SSLContext only; our loop's takes a TLSContext
                        return await loop.start_tls(
                            transport, protocol, cctx_offloaded,  # type: ignore[arg-type]
                            server_hostname="localhost")
                    task = asyncio.ensure_future(upgrade())
                await asyncio.sleep(0.1)   # inside the handshake, a job paused
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # a later connection still works
            transport, _ = await AA.create_connection(Recorder, "127.0.0.1", port_of(server),
                                                      ssl=cctx_offloaded,
                                                      server_hostname="localhost")
            transport.close()
            del transport   # an application's transport keeps its connection alive
        engine.clear()
        for _ in range(100):   # the paused jobs finish on their own, then everything is freed
            gc.collect()
            await asyncio.sleep(0.05)
            now = A.connection_counters()
            if now["live"] <= before["live"] and now["paused_now"] == before["paused_now"]:
                break
        now = A.connection_counters()
        assert now["paused_now"] == before["paused_now"]
        assert now["live"] <= before["live"], "a cancelled connection was never freed"

    run(main)


# == the test engine pausing every operation ======================================================
def test_echo_with_every_operation_paused(pki: Pki, engine: TestEngine, offload: A.Offload,
                                          no_jobs_left: None) -> None:
    engine.set(latency_ms=0.2)
    sctx = server_ctx(pki, offload)
    engine.enable_record_pauses(sctx)
    payload = os.urandom(1 << 20)

    async def main() -> None:
        before = offload.stats().pauses
        server = await AA.start_server(echo_handler, "127.0.0.1", 0, ssl=sctx)
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(server), ssl=stdlib_client_ctx(pki),
                server_hostname="localhost")
            assert await exchange(reader, writer, payload) == payload
            writer.close()
            await writer.wait_closed()
        assert offload.stats().pauses - before > 20   # reads and writes paused too

    run(main)



def test_an_application_connection_made_that_raises_fails_the_connection(pki: Pki) -> None:
    class Broken(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            raise ValueError("the application's bug")

    async def main() -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        server = await AA.start_server(echo_handler, "127.0.0.1", 0, ssl=server_ctx(pki))
        async with server:
            with pytest.raises(ValueError, match="the application's bug"):
                await AA.create_connection(Broken, "127.0.0.1", port_of(server),
                                           ssl=pki.client_ctx(), server_hostname="localhost")
        assert [type(c.get("exception")) for c in reported] == [ValueError]

    run(main)


def test_shutdown_timeout_when_the_peer_never_answers_close_notify(pki: Pki) -> None:
    """close() waits at most ssl_shutdown_timeout for the peer's close_notify (asyncio's rule)."""
    sctx = stdlib_server_ctx(pki)

    async def main() -> None:
        with listening_socket() as lsock:
            port = lsock.getsockname()[1]
            loop = asyncio.get_running_loop()
            held: list[socket.socket] = []

            async def mute_peer() -> None:   # handshakes, then never reads or answers
                conn, _ = await loop.sock_accept(lsock)
                held.append(conn)
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = sctx.wrap_bio(incoming, outgoing, server_side=True)
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        await loop.sock_sendall(conn, outgoing.read())
                        incoming.write(await loop.sock_recv(conn, 65536))
                await loop.sock_sendall(conn, outgoing.read())

            task = asyncio.ensure_future(mute_peer())
            transport, protocol = await AA.create_connection(
                Recorder, "127.0.0.1", port, ssl=pki.client_ctx(), server_hostname="localhost",
                ssl_shutdown_timeout=0.3)
            await task
            t0 = loop.time()
            transport.close()
            exc = await asyncio.wait_for(protocol.lost, TIMEOUT)  # type: ignore[attr-defined]
            assert isinstance(exc, TimeoutError) and "shutdown" in str(exc)
            assert 0.25 < loop.time() - t0 < 5
            for c in held:
                c.close()

    run(main)


def test_event_loop_policy_and_unix_sockets(pki: Pki, tmp_path: Any) -> None:
    path = str(tmp_path / "tls.sock")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert AA.is_tls_loop(loop)
        # (typeshed types ssl= an ssl.SSLContext; our loop's methods take a TLSContext)
        server = await loop.create_unix_server(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(), echo_handler),
            path, ssl=server_ctx(pki))  # type: ignore[arg-type]
        async with server:
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.create_unix_connection(
                lambda: protocol, path, ssl=pki.client_ctx(),  # type: ignore[arg-type]
                server_hostname="localhost")
            assert isinstance(transport, TLSTransport)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            assert await exchange(reader, writer, b"unix") == b"unix"
            writer.close()
            await writer.wait_closed()

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(AA.EventLoopPolicy())
    try:
        asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    finally:
        asyncio.set_event_loop_policy(old)
    stock = asyncio.new_event_loop()
    assert not AA.is_tls_loop(stock)
    stock.close()


def test_connections_are_freed_without_the_cycle_collector(pki: Pki, loop_kind: str) -> None:
    """Closed or aborted, a connection's SSL object goes with its last reference.

    Before, protocol -> driver -> protocol (bound methods), protocol <->
    application transport and protocol -> finished task -> CancelledError ->
    traceback -> protocol were cycles: every connection, client and server,
    waited for the cycle collector (40 of 40 alive after 20 connections with
    it off).  The server's protocol keeps its transport for ever, as uvicorn's
    do, so the application's side of the cycle is there too.
    """
    class Keeper(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)   # type: ignore[attr-defined]

    async def main() -> None:
        server = await AA.create_server(Keeper, "127.0.0.1", 0, ssl=server_ctx(pki))
        port = server.sockets[0].getsockname()[1]
        gc.collect()
        gc.disable()
        try:
            baseline = A.connection_counters()["live"]
            for i in range(6):
                r, w = await AA.open_connection("127.0.0.1", port, ssl=pki.client_ctx(),
                                                server_hostname="localhost")
                w.write(b"ping")
                assert await r.readexactly(4) == b"ping"
                if i % 2:
                    w.transport.abort()
                else:
                    w.close()
                    await w.wait_closed()
                del r, w
            for _ in range(500):      # the server's side closes after the client's
                if A.connection_counters()["live"] == baseline:
                    break
                await asyncio.sleep(0.01)
            assert A.connection_counters()["live"] == baseline
        finally:
            gc.enable()
            server.close()
            await server.wait_closed()

    run(main, loop_kind)
