"""The anyio face against the portable behaviours of anyio's and trio's TLS test suites.

Every test runs on both anyio backends (asyncio and trio).  Peers are our own
AsyncTLSStream, anyio's TLSStream over the stdlib ``ssl`` module, or a
hand-driven ``ssl.SSLObject`` when a test needs exact control of the bytes on
the wire.  Transports are loopback TCP, a Unix socket pair, or in-memory byte
streams (anyio memory object streams stapled into a byte stream), some wrapped
to block or fail on demand.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import pytest
import trustme
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    aclose_forcefully,
)
from anyio.abc import ByteStream, SocketAttribute, SocketStream, UNIXSocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.tls import TLSAttribute, TLSStream
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.stream import (
    AsyncTLSAttribute,
    AsyncTLSListener,
    AsyncTLSStream,
    connect_tcp,
)
from anyio_asyncssl.testing import TestEngine

pytestmark = pytest.mark.anyio

TIMEOUT = 20  # generous: the machine is shared
V12 = ssl.TLSVersion.TLSv1_2
V13 = ssl.TLSVersion.TLSv1_3
VERSION_NAMES = {V12: "TLSv1.2", V13: "TLSv1.3"}


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- transports -------------------------------------------------------------------
@dataclass(eq=False)
class MemoryByteStream(ByteStream):
    """One end of an in-memory byte pipe (memory object streams of bytes)."""

    send_stream: MemoryObjectSendStream[bytes]
    receive_stream: MemoryObjectReceiveStream[bytes]
    _pending: bytearray = field(default_factory=bytearray)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending += await self.receive_stream.receive()
        data = bytes(self._pending[:max_bytes])
        del self._pending[:max_bytes]
        return data

    async def send(self, item: bytes) -> None:
        await self.send_stream.send(bytes(item))

    async def send_eof(self) -> None:
        await self.send_stream.aclose()

    async def aclose(self) -> None:
        await self.send_stream.aclose()
        await self.receive_stream.aclose()


def memory_pipe(buffer: float = math.inf) -> tuple[MemoryByteStream, MemoryByteStream]:
    # unbounded by default, as a socket's buffers are for the amounts most
    # tests send: both sides may send their close_notify before either reads
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)


@dataclass(eq=False)
class PassThrough(ByteStream):
    """Any other byte stream over a socket: TLS then goes through memory BIOs."""

    inner: ByteStream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


@dataclass(eq=False)
class ControlledStream(ByteStream):
    """Wraps a transport: can hold sends at a gate, and can fail on demand."""

    inner: ByteStream
    gate: anyio.Event | None = None
    send_entered: anyio.Event = field(default_factory=anyio.Event)
    send_fails_with: BaseException | None = None
    receive_fails_with: BaseException | None = None

    def fail(self, exc: BaseException | None) -> None:
        self.send_fails_with = self.receive_fails_with = exc

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.receive_fails_with is not None:
            raise self.receive_fails_with
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        self.send_entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.send_fails_with is not None:
            raise self.send_fails_with
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


@asynccontextmanager
async def transport_pair(kind: str) -> AsyncIterator[tuple[ByteStream, ByteStream]]:
    """(client end, server end) of a fresh transport; both closed on exit."""
    client: ByteStream
    server: ByteStream
    if kind in ("tcp", "tcp-membio"):
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as multi:
            listener: Any = multi.listeners[0]
            port = listener.extra(SocketAttribute.local_port)
            client = await anyio.connect_tcp("127.0.0.1", port)
            server = await listener.accept()
        if kind == "tcp-membio":
            # a stream we do not recognise as a socket: the memory-BIO path
            client, server = PassThrough(client), PassThrough(server)
    elif kind == "socketpair":
        a, b = socket.socketpair()
        client = await UNIXSocketStream.from_socket(a)
        server = await UNIXSocketStream.from_socket(b)
    elif kind == "memory-bounded":
        # backpressure: a sender blocks until the peer reads
        client, server = memory_pipe(2)
    else:
        client, server = memory_pipe()
    try:
        yield client, server
    finally:
        with anyio.CancelScope(shield=True):
            await aclose_forcefully(client)
            await aclose_forcefully(server)


# -- contexts -----------------------------------------------------------------------
def server_ctx(pki: Pki, kind: str = "rsa", offload: A.Offload | None = None,
               version: ssl.TLSVersion | None = None) -> A.TLSContext:
    ctx = pki.server_ctx(kind, offload=offload)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def client_ctx(pki: Pki, version: ssl.TLSVersion | None = None) -> A.TLSContext:
    ctx = pki.client_ctx()
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def stdlib_server_ctx(pki: Pki, kind: str = "rsa",
                      version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.rsa_file if kind == "rsa" else pki.ec_file)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def stdlib_client_ctx(pki: Pki, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if hasattr(ssl, "OP_IGNORE_UNEXPECTED_EOF"):
        ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return ctx


async def tls_pair(
    client_transport: ByteStream,
    server_transport: ByteStream,
    cctx: A.TLSContext,
    sctx: A.TLSContext,
    *,
    hostname: str = "localhost",
    client_kw: dict[str, Any] | None = None,
    server_kw: dict[str, Any] | None = None,
) -> tuple[AsyncTLSStream, AsyncTLSStream]:
    """Handshake both sides concurrently; returns (client, server).

    A failure is raised as is (the client's first), not in an exception group.
    """
    servers: list[AsyncTLSStream] = []
    errors: list[Exception] = []

    async def serve() -> None:
        try:
            servers.append(await AsyncTLSStream.wrap(
                server_transport, context=sctx, server_side=True, **(server_kw or {})))
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        try:
            client = await AsyncTLSStream.wrap(client_transport, context=cctx,
                                               hostname=hostname, **(client_kw or {}))
        except Exception as exc:
            errors.insert(0, exc)
            tg.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return client, servers[0]


@asynccontextmanager
async def connected(
    pki: Pki,
    transport: str = "memory",
    *,
    cctx: A.TLSContext | None = None,
    sctx: A.TLSContext | None = None,
    version: ssl.TLSVersion | None = None,
    client_kw: dict[str, Any] | None = None,
    server_kw: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[AsyncTLSStream, AsyncTLSStream]]:
    """Our client and our server over a fresh transport (closed forcefully on exit)."""
    async with transport_pair(transport) as (ct, st):
        client, server = await tls_pair(
            ct, st, cctx or client_ctx(pki, version), sctx or server_ctx(pki, version=version),
            client_kw=client_kw, server_kw=server_kw)
        yield client, server


async def receive_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive()
    return bytes(buf)


async def echo_once(client: Any, server: Any, payload: bytes) -> None:
    async def echo() -> None:
        await server.send(await receive_exactly(server, len(payload)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(echo)
        await client.send(payload)
        assert await receive_exactly(client, len(payload)) == payload


# ==================================================================================
# echo: transports x offload x key type x TLS version
# ==================================================================================
@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory", "socketpair"])
@pytest.mark.parametrize("use_offload", [True, False], ids=["offload", "inline"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_echo_ours_both_sides(pki: Pki, engine: TestEngine, offload: A.Offload,
                                    transport: str, use_offload: bool, kind: str,
                                    version: ssl.TLSVersion) -> None:
    if use_offload:
        engine.set(latency_ms=2)  # the signature really pauses the handshake
    sctx = server_ctx(pki, kind, offload if use_offload else None, version)
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport, sctx=sctx, version=version) as (client, server):
            assert client.extra(TLSAttribute.tls_version) == VERSION_NAMES[version]
            assert server.extra(TLSAttribute.tls_version) == VERSION_NAMES[version]
            assert client.extra(TLSAttribute.server_side) is False
            assert server.extra(TLSAttribute.server_side) is True
            if use_offload:
                assert server.extra(AsyncTLSAttribute.pauses) >= 1
                assert server.extra(AsyncTLSAttribute.offload) is offload
            else:
                assert server.extra(AsyncTLSAttribute.pauses) == 0
                assert server.extra(AsyncTLSAttribute.offload) is None
            for size in (1, 1000, 70_000):
                await echo_once(client, server, os.urandom(size))
            # and the other way round
            await echo_once(server, client, b"from the server")
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                await client.aclose()


@pytest.mark.parametrize("use_offload", [True, False], ids=["offload", "inline"])
async def test_connect_tcp_and_listener_echo(pki: Pki, engine: TestEngine, offload: A.Offload,
                                             use_offload: bool) -> None:
    if use_offload:
        engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload if use_offload else None)

    async def handler(stream: AsyncTLSStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive())
            except EndOfStream:
                pass

    with anyio.fail_after(TIMEOUT):
        listener = AsyncTLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"),
                                    sctx)
        port = listener.listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            for _ in range(3):
                stream = await connect_tcp("127.0.0.1", port, context=client_ctx(pki),
                                           hostname="localhost")
                async with stream:
                    await stream.send(b"ping")
                    assert await stream.receive() == b"ping"
            # hostname defaults to the host: the certificate names 127.0.0.1 too
            async with await connect_tcp("127.0.0.1", port, context=client_ctx(pki)) as stream:
                await stream.send(b"by address")
                assert await stream.receive() == b"by address"
            tg.cancel_scope.cancel()


async def test_connect_tcp_verifies_the_host_name(pki: Pki) -> None:
    sctx = server_ctx(pki)

    async def handler(stream: AsyncTLSStream) -> None:
        await stream.aclose()

    class QuietListener(AsyncTLSListener):
        @staticmethod
        async def handle_handshake_error(exc: BaseException, stream: Any) -> None:
            await aclose_forcefully(stream)

    with anyio.fail_after(TIMEOUT):
        listener = QuietListener(await anyio.create_tcp_listener(local_host="127.0.0.1"), sctx)
        port = listener.listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect_tcp("127.0.0.1", port, context=client_ctx(pki),
                                  hostname="wrong.example.org")
            tg.cancel_scope.cancel()


# ==================================================================================
# the stdlib ssl module as the peer
# ==================================================================================
@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_our_client_against_stdlib_server(pki: Pki, transport: str, kind: str,
                                                version: ssl.TLSVersion) -> None:
    ssl_ctx = stdlib_server_ctx(pki, kind, version)
    ssl_ctx.set_alpn_protocols(["h2", "http/1.1"])
    cctx = client_ctx(pki)
    cctx.set_alpn_protocols(["http/1.1"])
    with anyio.fail_after(TIMEOUT):
        async with transport_pair(transport) as (ct, st):
            async with anyio.create_task_group() as tg:

                async def serve() -> None:
                    peer = await TLSStream.wrap(st, server_side=True, ssl_context=ssl_ctx)
                    assert peer.extra(TLSAttribute.alpn_protocol) == "http/1.1"
                    data = await receive_exactly(peer, 5)
                    await peer.send(data[::-1])
                    with pytest.raises(EndOfStream):
                        await peer.receive()
                    await peer.aclose()

                tg.start_soon(serve)
                client = await AsyncTLSStream.wrap(ct, context=cctx, hostname="localhost")
                assert client.extra(TLSAttribute.tls_version) == VERSION_NAMES[version]
                assert client.extra(TLSAttribute.alpn_protocol) == "http/1.1"
                await client.send(b"hello")
                assert await receive_exactly(client, 5) == b"olleh"
                await client.aclose()


@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
@pytest.mark.parametrize("use_offload", [True, False], ids=["offload", "inline"])
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_our_server_against_stdlib_client(pki: Pki, engine: TestEngine,
                                                offload: A.Offload, transport: str,
                                                use_offload: bool,
                                                version: ssl.TLSVersion) -> None:
    if use_offload:
        engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload if use_offload else None)
    ssl_ctx = stdlib_client_ctx(pki, version)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair(transport) as (ct, st):
            async with anyio.create_task_group() as tg:

                async def serve() -> None:
                    server = await AsyncTLSStream.wrap(st, context=sctx, server_side=True)
                    assert server.extra(TLSAttribute.tls_version) == VERSION_NAMES[version]
                    data = await receive_exactly(server, 70_000)
                    await server.send(data[::-1])
                    with pytest.raises(EndOfStream):
                        await server.receive()
                    await server.aclose()

                tg.start_soon(serve)
                peer = await TLSStream.wrap(ct, hostname="localhost", ssl_context=ssl_ctx)
                payload = os.urandom(70_000)
                await peer.send(payload)
                assert await receive_exactly(peer, len(payload)) == payload[::-1]
                await peer.aclose()


def stdlib_listening_socket(pki: Pki) -> ssl.SSLSocket:
    """A blocking stdlib TLS server socket listening on 127.0.0.1 (ragged EOFs raise)."""
    sock = stdlib_server_ctx(pki).wrap_socket(socket.socket(), server_side=True,
                                              suppress_ragged_eofs=False)
    sock.settimeout(TIMEOUT)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_our_client_against_blocking_stdlib_server_thread(pki: Pki) -> None:
    """anyio's test_send_receive shape: a blocking ssl socket served from a thread."""
    server_sock = stdlib_listening_socket(pki)

    def serve_sync() -> None:
        conn, _ = server_sock.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            data = conn.recv(10)
            conn.sendall(data[::-1])
            conn.unwrap()

    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, serve_sync)
                port = server_sock.getsockname()[1]
                async with await connect_tcp("127.0.0.1", port, context=client_ctx(pki),
                                             hostname="localhost") as stream:
                    await stream.send(b"hello")
                    assert await stream.receive() == b"olleh"
    finally:
        server_sock.close()


# ==================================================================================
# full duplex, busy errors
# ==================================================================================
@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory", "memory-bounded"])
@pytest.mark.parametrize("mode", ["offload", "inline", "record-pauses"])
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_full_duplex(pki: Pki, engine: TestEngine, offload: A.Offload, transport: str,
                           mode: str, version: ssl.TLSVersion) -> None:
    """30 x 32 KiB each way at once; one task sends while another receives, on each side.

    ``memory-bounded``: a sender blocks until the peer reads, so a receive
    that waited behind its own side's blocked send would deadlock.
    ``record-pauses``: the server's reads and writes pause in the engine too.
    """
    if mode != "inline":
        engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload if mode != "inline" else None, version=version)
    if mode == "record-pauses":
        engine.set(latency_ms=0.2)
        engine.enable_record_pauses(sctx)
    chunk, count = 32 * 1024, 30
    c_payload = os.urandom(chunk * count)
    s_payload = os.urandom(chunk * count)
    got: dict[str, bytes] = {}

    async def sender(stream: AsyncTLSStream, payload: bytes) -> None:
        for i in range(count):
            await stream.send(payload[i * chunk:(i + 1) * chunk])

    async def receiver(stream: AsyncTLSStream, name: str, n: int) -> None:
        got[name] = await receive_exactly(stream, n)

    with anyio.fail_after(TIMEOUT * 2):
        async with connected(pki, transport, sctx=sctx, version=version) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender, client, c_payload)
                tg.start_soon(sender, server, s_payload)
                tg.start_soon(receiver, client, "client", len(s_payload))
                tg.start_soon(receiver, server, "server", len(c_payload))
            if mode == "record-pauses":
                # every record the server reads or writes paused (a read that
                # takes several records pauses for each within one wait)
                paused = server.extra(AsyncTLSAttribute.async_stats)["want_async"]
                assert paused > 2 * count
    assert got["server"] == c_payload
    assert got["client"] == s_payload


@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
async def test_one_send_of_several_mebibytes_arrives_once(pki: Pki, transport: str) -> None:
    """A send bigger than one step's output buffer (asyncio's transports write such)."""
    payload = os.urandom(3 << 20)
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, payload)
                assert await receive_exactly(server, len(payload)) == payload


async def test_second_concurrent_receive_is_busy(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.receive)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(BusyResourceError):
                    await client.receive()
                tg.cancel_scope.cancel()
            # the stream is still usable after the cancelled receive
            await echo_once(client, server, b"after")


async def test_second_concurrent_send_is_busy(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            gated = ControlledStream(ct)
            client, server = await tls_pair(gated, st, client_ctx(pki), server_ctx(pki))
            gated.gate = anyio.Event()
            gated.send_entered = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, b"first")
                await gated.send_entered.wait()
                with pytest.raises(BusyResourceError):
                    await client.send(b"second")
                with pytest.raises(BusyResourceError):
                    await client.send_eof()
                gated.gate.set()
            assert await receive_exactly(server, 5) == b"first"
            # a receive may run while a send is held
            gated.gate = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, b"x" * 100)
                await server.send(b"reply")
                assert await client.receive() == b"reply"
                gated.gate.set()
            assert await receive_exactly(server, 100) == b"x" * 100


async def test_receive_honours_max_bytes_and_send_of_nothing(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki) as (client, server):
            await client.send(b"")
            await client.send(b"0123456789")
            parts = [await server.receive(3)]
            while sum(map(len, parts)) < 10:
                part = await server.receive(3)
                assert 1 <= len(part) <= 3
                parts.append(part)
            assert b"".join(parts) == b"0123456789"
            with pytest.raises(ValueError):
                await server.receive(0)


# ==================================================================================
# closing: unwrap, graceful close, ragged EOFs, aclose, broken transports
# ==================================================================================
@pytest.mark.parametrize("peer", ["ours", "stdlib-thread"])
async def test_unwrap_returns_the_transport_and_trailing_data(pki: Pki, peer: str) -> None:
    """anyio's test_unwrap: plaintext after the peer's close_notify survives unwrap."""
    with anyio.fail_after(TIMEOUT):
        if peer == "ours":
            async with transport_pair("tcp") as (ct, st):
                client, server = await tls_pair(ct, st, client_ctx(pki), server_ctx(pki))

                async def serve() -> None:
                    await server.send(b"encrypted")
                    transport, trailing = await server.unwrap()
                    assert trailing == b""
                    await transport.send(b"unencrypted")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(serve)
                    assert await client.receive() == b"encrypted"
                    plain, msg = await client.unwrap()
                assert plain is ct
                if msg != b"unencrypted":
                    msg += await receive_exactly(plain, len(b"unencrypted") - len(msg))
                assert msg == b"unencrypted"
            return

        server_sock = stdlib_listening_socket(pki)

        def serve_sync() -> None:
            conn, _ = server_sock.accept()
            conn.settimeout(TIMEOUT)
            conn.sendall(b"encrypted")
            unencrypted = conn.unwrap()
            unencrypted.sendall(b"unencrypted")
            unencrypted.close()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, serve_sync)
                port = server_sock.getsockname()[1]
                async with await anyio.connect_tcp("127.0.0.1", port) as ct:
                    client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki),
                                                       hostname="localhost")
                    assert await client.receive() == b"encrypted"
                    plain, msg = await client.unwrap()
                    assert plain is ct
                    if msg != b"unencrypted":
                        msg += await receive_exactly(plain, len(b"unencrypted") - len(msg))
                    assert msg == b"unencrypted"
        finally:
            server_sock.close()


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_unwrap_trailing_bytes_in_the_close_notify_segment(pki: Pki,
                                                                 version: ssl.TLSVersion) -> None:
    """Plaintext that arrives in the same chunk as the close_notify comes back exactly."""
    ssl_ctx = stdlib_server_ctx(pki, version=version)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            peer = ssl_ctx.wrap_bio(incoming, outgoing, server_side=True)

            async def serve() -> None:
                while True:
                    try:
                        peer.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        if outgoing.pending:
                            await st.send(outgoing.read())
                        incoming.write(await st.receive())
                if outgoing.pending:
                    await st.send(outgoing.read())
                peer.write(b"encrypted")
                with pytest.raises(ssl.SSLWantReadError):
                    peer.unwrap()  # sends close_notify, then wants the client's
                # the close_notify and the plaintext leave in one transport chunk
                await st.send(outgoing.read() + b"unencrypted")

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki),
                                                   hostname="localhost")
                assert await client.receive() == b"encrypted"
                plain, trailing = await client.unwrap()
            assert plain is ct
            assert trailing == b"unencrypted"
            # the peer received our close_notify
            incoming.write(await st.receive())
            peer.unwrap()
            with pytest.raises(ClosedResourceError):
                await client.receive()


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_graceful_close_is_seen_twice(pki: Pki, version: ssl.TLSVersion) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp", version=version) as (client, server):
            async with anyio.create_task_group() as tg:

                async def close_server() -> None:
                    await server.send(b"bye")
                    await server.aclose()

                tg.start_soon(close_server)
                assert await client.receive() == b"bye"
                with pytest.raises(EndOfStream):
                    await client.receive()
                with pytest.raises(EndOfStream):
                    await client.receive()
                await client.aclose()


async def test_operations_after_aclose_raise_closed_resource_error(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, version=V13) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                await client.aclose()
            await client.aclose()  # idempotent
            for stream in (client, server):
                with pytest.raises(ClosedResourceError):
                    await stream.receive()
                with pytest.raises(ClosedResourceError):
                    await stream.send(b"x")
                with pytest.raises(ClosedResourceError):
                    await stream.send_eof()
                with pytest.raises(ClosedResourceError):
                    await stream.unwrap()
                # attributes stay readable
                assert stream.extra(TLSAttribute.tls_version) == "TLSv1.3"


async def test_aclose_closes_the_transport(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp") as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                await client.aclose()
            for stream in (client, server):
                with pytest.raises(ClosedResourceError):
                    await stream.transport_stream.send(b"x")


@pytest.mark.parametrize("peer", ["ours", "anyio"])
@pytest.mark.parametrize(
    ("server_compatible", "client_compatible"),
    [
        pytest.param(True, True, id="both_standard"),
        pytest.param(True, False, id="server_standard"),
        pytest.param(False, True, id="client_standard"),
        pytest.param(False, False, id="neither_standard"),
    ],
)
async def test_ragged_eofs(pki: Pki, peer: str, server_compatible: bool,
                           client_compatible: bool) -> None:
    """anyio's test_ragged_eofs: our client against a server that may skip close_notify."""
    server_exc: BaseException | None = None
    ssl_ctx = stdlib_server_ctx(pki)
    # Debian's python3 (not upstream CPython) turns OP_IGNORE_UNEXPECTED_EOF on
    # by default, and its stdlib then takes a missing close_notify as a clean
    # end; anyio's test, like ours, means upstream's stdlib
    ssl_ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF

    async def serve(st: ByteStream) -> None:
        nonlocal server_exc
        try:
            stream: Any
            if peer == "ours":
                stream = await AsyncTLSStream.wrap(st, context=server_ctx(pki),
                                                   server_side=True,
                                                   standard_compatible=server_compatible)
            else:
                stream = await TLSStream.wrap(st, server_side=True, ssl_context=ssl_ctx,
                                              standard_compatible=server_compatible)
            await stream.send(b"hello")
            await stream.aclose()  # with close_notify only when standard_compatible
        except BaseException as exc:
            server_exc = exc
        finally:
            await aclose_forcefully(st)

    with anyio.fail_after(TIMEOUT):
        async with transport_pair("tcp") as (ct, st), anyio.create_task_group() as tg:
            tg.start_soon(serve, st)
            client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki), hostname="localhost",
                                               standard_compatible=client_compatible)
            assert client.extra(TLSAttribute.standard_compatible) is client_compatible
            assert await client.receive() == b"hello"
            if client_compatible and not server_compatible:
                with pytest.raises(BrokenResourceError):
                    await client.aclose()
            else:
                await client.aclose()

    if server_compatible and not client_compatible:
        # the server waited for a close_notify that never came
        assert isinstance(server_exc, (BrokenResourceError, OSError)), server_exc
    else:
        assert server_exc is None


@pytest.mark.parametrize("peer", ["ours", "anyio"])
@pytest.mark.parametrize("standard_compatible", [True, False])
async def test_ragged_eof_on_receive(pki: Pki, peer: str, standard_compatible: bool) -> None:
    """The peer closes the transport without close_notify."""
    ssl_ctx = stdlib_server_ctx(pki)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("tcp") as (ct, st), anyio.create_task_group() as tg:

            async def serve() -> None:
                stream: Any
                if peer == "ours":
                    stream = await AsyncTLSStream.wrap(st, context=server_ctx(pki),
                                                       server_side=True,
                                                       standard_compatible=False)
                else:
                    stream = await TLSStream.wrap(st, server_side=True, ssl_context=ssl_ctx,
                                                  standard_compatible=False)
                await stream.send(b"hello")
                await stream.aclose()

            tg.start_soon(serve)
            client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki), hostname="localhost",
                                               standard_compatible=standard_compatible)
            assert await client.receive() == b"hello"
            expected = BrokenResourceError if standard_compatible else EndOfStream
            with pytest.raises(expected):
                await client.receive()
            if standard_compatible:
                with pytest.raises(BrokenResourceError):  # and it stays broken
                    await client.send(b"more")
            await client.aclose()


@pytest.mark.parametrize("standard_compatible", [True, False])
async def test_transport_eof_during_the_handshake(pki: Pki, standard_compatible: bool) -> None:
    """trio's test_https_mode_eof_before_handshake: an EOF before any data is an error."""
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            await st.aclose()
            with pytest.raises((BrokenResourceError, EndOfStream)):
                await AsyncTLSStream.wrap(ct, context=client_ctx(pki), hostname="localhost",
                                          standard_compatible=standard_compatible)


@pytest.mark.parametrize("failure", ["broken", "oserror"])
@pytest.mark.parametrize("direction", ["send", "receive"])
async def test_transport_failure_breaks_the_stream(pki: Pki, failure: str,
                                                   direction: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            faulty = ControlledStream(ct)
            client, server = await tls_pair(faulty, st, client_ctx(pki), server_ctx(pki))
            await echo_once(client, server, b"fine so far")
            faulty.fail(BrokenResourceError() if failure == "broken"
                        else ConnectionResetError(104, "reset by peer"))
            with pytest.raises(BrokenResourceError):
                if direction == "send":
                    await client.send(b"lost")
                else:
                    await client.receive()
            # the failure sticks, though the transport would work again
            faulty.fail(None)
            with pytest.raises(BrokenResourceError):
                await client.send(b"x")
            with pytest.raises(BrokenResourceError):
                await client.receive()
            with pytest.raises(BrokenResourceError):
                await client.unwrap()
            await client.aclose()  # no closing handshake on a broken stream
            with pytest.raises(ClosedResourceError):
                await client.receive()


async def test_peer_disappearing_mid_stream_breaks_the_stream(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp") as (client, server):
            await echo_once(client, server, b"fine so far")
            await aclose_forcefully(server.transport_stream)
            with pytest.raises(BrokenResourceError):
                for _ in range(1000):  # the RST may take a few sends to show
                    await client.send(b"x" * 16384)
                await client.receive()
            with pytest.raises(BrokenResourceError):
                await client.send(b"x")


@pytest.mark.parametrize("direction", ["send", "receive"])
@pytest.mark.parametrize("side", ["client", "server"])
async def test_transport_failure_during_the_handshake(pki: Pki, engine: TestEngine,
                                                      offload: A.Offload, direction: str,
                                                      side: str) -> None:
    """trio's test_send_error_during_handshake / test_receive_error_during_handshake."""
    engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            faulty = ControlledStream(ct if side == "client" else st)
            err = ConnectionResetError(104, "reset by peer")
            if direction == "send":
                faulty.send_fails_with = err
            else:
                # the first flight goes out, then the answer cannot be read
                faulty.receive_fails_with = err
            transports = (faulty, st) if side == "client" else (ct, faulty)
            outcome: dict[str, BaseException] = {}

            async def attempt(name: str, coro: Any) -> None:
                try:
                    await coro
                except BaseException as exc:
                    outcome[name] = exc
                    tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt, "server", AsyncTLSStream.wrap(
                    transports[1], context=sctx, server_side=True))
                tg.start_soon(attempt, "client", AsyncTLSStream.wrap(
                    transports[0], context=client_ctx(pki), hostname="localhost"))
            assert isinstance(outcome[side], BrokenResourceError)
            assert isinstance(outcome[side].__cause__, ConnectionResetError)


@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
async def test_aclose_forcefully_skips_the_closing_handshake(pki: Pki, transport: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport) as (client, server):
            await echo_once(client, server, b"hi")
            # (the server would never answer a close_notify) a forceful close does not
            # wait: like anyio's TLSStream, it closes the transport at once
            await aclose_forcefully(client)
            with pytest.raises(ClosedResourceError):
                await client.receive()
            with pytest.raises(ClosedResourceError):
                await client.transport_stream.send(b"x")
            # so the peer sees a ragged EOF
            with pytest.raises(BrokenResourceError):
                await server.receive()


async def test_cancelled_aclose_still_closes_the_transport(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp") as (client, server):
            with anyio.move_on_after(0.2) as scope:
                await client.aclose()  # waits for a close_notify the server never sends
            assert scope.cancelled_caught
            with pytest.raises(ClosedResourceError):
                await client.transport_stream.send(b"x")
            with pytest.raises(ClosedResourceError):
                await client.send(b"x")
            with pytest.raises(EndOfStream):
                await server.receive()


# ==================================================================================
# attributes
# ==================================================================================
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_extra_attributes(pki: Pki, version: ssl.TLSVersion) -> None:
    sctx = server_ctx(pki, version=version)
    cctx = client_ctx(pki, version)
    sctx.set_alpn_protocols(["dummy1", "dummy2"])
    cctx.set_alpn_protocols(["dummy2", "dummy3"])
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp", cctx=cctx, sctx=sctx,
                             client_kw={"standard_compatible": False}) as (client, server):
            transport = client.transport_stream
            for name, attribute in SocketAttribute.__dict__.items():
                if not name.startswith("_"):
                    assert client.extra(attribute) == transport.extra(attribute), name
            assert (client.extra(SocketAttribute.remote_address)
                    == server.extra(SocketAttribute.local_address))
            for stream in (client, server):
                assert stream.extra(TLSAttribute.alpn_protocol) == "dummy2"
                assert stream.extra(TLSAttribute.tls_version) == VERSION_NAMES[version]
                cipher = stream.extra(TLSAttribute.cipher)
                assert isinstance(cipher, tuple) and len(cipher) == 3
                assert stream.extra(TLSAttribute.ssl_object) is cast(Any, stream.ssl_object)
                assert isinstance(stream.ssl_object, A.TLSConnection)
                assert stream.extra(AsyncTLSAttribute.session_reused) is False
                stats = stream.extra(AsyncTLSAttribute.async_stats)
                assert isinstance(stats, dict) and "wakeups" in stats
            assert client.extra(TLSAttribute.cipher) == server.extra(TLSAttribute.cipher)
            assert client.extra(TLSAttribute.standard_compatible) is False
            assert server.extra(TLSAttribute.standard_compatible) is True
            assert client.extra(TLSAttribute.server_side) is False
            assert server.extra(TLSAttribute.server_side) is True
            # shared ciphers: a list on the server, None on the client
            assert client.extra(TLSAttribute.shared_ciphers) is None
            shared = server.extra(TLSAttribute.shared_ciphers)
            assert isinstance(shared, list) and shared
            assert all(isinstance(c, tuple) and len(c) == 3 for c in shared)
            assert server.extra(TLSAttribute.cipher)[0] in {c[0] for c in shared}
            # channel binding: both ends agree
            cb_client = client.extra(TLSAttribute.channel_binding_tls_unique)
            cb_server = server.extra(TLSAttribute.channel_binding_tls_unique)
            assert isinstance(cb_client, bytes)
            if version == V12:
                assert cb_client == cb_server
            await echo_once(client, server, b"\x00")


async def test_alpn_no_overlap_and_none(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki) as (client, server):
            assert client.extra(TLSAttribute.alpn_protocol) is None
            assert server.extra(TLSAttribute.alpn_protocol) is None


async def test_channel_binding_matches_the_stdlib_peer(pki: Pki) -> None:
    ssl_ctx = stdlib_server_ctx(pki, version=V12)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st), anyio.create_task_group() as tg:
            peers: list[TLSStream] = []

            async def serve() -> None:
                peers.append(await TLSStream.wrap(st, server_side=True, ssl_context=ssl_ctx))

            tg.start_soon(serve)
            client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki),
                                               hostname="localhost")
            await anyio.wait_all_tasks_blocked()
            await echo_once(client, peers[0], b"sync")
            assert (client.extra(TLSAttribute.channel_binding_tls_unique)
                    == peers[0].extra(TLSAttribute.channel_binding_tls_unique))


def _cert_file(pki: Pki, kind: str) -> str:
    """The leaf certificate of pki's ``kind`` file, alone in a PEM file."""
    src = {"rsa": pki.rsa_file, "ec": pki.ec_file, "client": pki.client_file}[kind]
    pem = src.read_text()
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    path = pki.tmp / f"{kind}-leaf.pem"
    path.write_text(pem[start:end] + "\n")
    return str(path)


def _leaf_der(pki: Pki, kind: str) -> bytes:
    with open(_cert_file(pki, kind)) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_peer_certificate(pki: Pki, kind: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, sctx=server_ctx(pki, kind)) as (client, server):
            cert = client.extra(TLSAttribute.peer_certificate)
            assert isinstance(cert, dict)
            assert ("DNS", "localhost") in cert["subjectAltName"]
            assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
            # the stdlib's own decoding of the same certificate
            assert cert == ssl._ssl._test_decode_cert(_cert_file(pki, kind))  # type: ignore
            der = client.extra(TLSAttribute.peer_certificate_binary)
            assert der == _leaf_der(pki, kind)
            # the server asked for no client certificate
            assert server.extra(TLSAttribute.peer_certificate) is None
            assert server.extra(TLSAttribute.peer_certificate_binary) is None


async def test_idna_host_name(pki: Pki) -> None:
    name = "ñandú.example"
    cert = pki.ca.issue_cert(name)
    path = pki.tmp / "idna.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(path)
    sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(path)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            client, server = await tls_pair(ct, st, client_ctx(pki), sctx, hostname=name)
            san = cast(Any, client.extra(TLSAttribute.peer_certificate))["subjectAltName"]
            assert san == (("DNS", "xn--and-6ma2c.example"),)
            assert client.ssl_object.server_hostname == "xn--and-6ma2c.example"
            await echo_once(client, server, name.encode())
        # the A-label works too; another name does not
        async with transport_pair("memory") as (ct, st):
            await tls_pair(ct, st, client_ctx(pki), sctx, hostname="xn--and-6ma2c.example")
        async with transport_pair("memory") as (ct, st):
            with pytest.raises(ssl.SSLCertVerificationError):
                await tls_pair(ct, st, client_ctx(pki), sctx, hostname="nandu.example")


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_mutual_tls(pki: Pki, engine: TestEngine, offload: A.Offload,
                          version: ssl.TLSVersion) -> None:
    engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload, version=version)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(pki.ca_file)
    cctx = client_ctx(pki, version)
    cctx.load_cert_chain(pki.client_file)
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, cctx=cctx, sctx=sctx) as (client, server):
            await echo_once(client, server, b"who are you")
            cert = cast(Any, server.extra(TLSAttribute.peer_certificate))
            assert ("email", "client@example.com") in cert["subjectAltName"]
            assert (("commonName", "test client"),) in cert["subject"]
            assert server.extra(TLSAttribute.peer_certificate_binary) == _leaf_der(pki, "client")


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_mutual_tls_refuses_a_client_without_certificate(
        pki: Pki, version: ssl.TLSVersion) -> None:
    sctx = server_ctx(pki, version=version)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(pki.ca_file)
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            server_exc: list[BaseException] = []

            async def serve() -> None:
                try:
                    await AsyncTLSStream.wrap(st, context=sctx, server_side=True)
                except ssl.SSLError as exc:
                    server_exc.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                with pytest.raises((ssl.SSLError, BrokenResourceError)):
                    # TLS 1.3: the client's handshake ends first; the alert comes later
                    client = await AsyncTLSStream.wrap(ct, context=client_ctx(pki),
                                                       hostname="localhost")
                    await client.receive()
            assert len(server_exc) == 1
            assert isinstance(server_exc[0], A.TLSError)


async def test_handshake_failure_raises_ssl_error(pki: Pki) -> None:
    """An untrusted server: the client's wrap raises an ssl.SSLError subclass."""
    untrusted = A.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            async with anyio.create_task_group() as tg:

                async def serve() -> None:
                    with pytest.raises((ssl.SSLError, BrokenResourceError)):
                        await AsyncTLSStream.wrap(st, context=server_ctx(pki),
                                                  server_side=True)

                tg.start_soon(serve)
                with pytest.raises(ssl.SSLCertVerificationError) as info:
                    await AsyncTLSStream.wrap(ct, context=untrusted, hostname="localhost")
                assert isinstance(info.value, A.CertificateVerifyError)


async def test_wrap_defaults(pki: Pki) -> None:
    """server_side defaults to ``not hostname``; ``ssl_context`` is an alias of context."""
    with anyio.fail_after(TIMEOUT):
        async with transport_pair("memory") as (ct, st):
            async with anyio.create_task_group() as tg:
                servers: list[AsyncTLSStream] = []

                async def serve() -> None:
                    servers.append(await AsyncTLSStream.wrap(st, ssl_context=server_ctx(pki)))

                tg.start_soon(serve)
                client = await AsyncTLSStream.wrap(ct, ssl_context=client_ctx(pki),
                                                   hostname="localhost")
            assert servers[0].extra(TLSAttribute.server_side) is True
            assert client.extra(TLSAttribute.server_side) is False
        # without a context the client trusts the system store, not our test CA
        async with transport_pair("memory") as (ct, st):
            async with anyio.create_task_group() as tg:

                async def serve_quietly() -> None:
                    with pytest.raises((ssl.SSLError, BrokenResourceError)):
                        await AsyncTLSStream.wrap(st, context=server_ctx(pki),
                                                  server_side=True)

                tg.start_soon(serve_quietly)
                with pytest.raises(ssl.SSLCertVerificationError):
                    await AsyncTLSStream.wrap(ct, hostname="localhost")


# ==================================================================================
# AsyncTLSListener
# ==================================================================================
class RecordingListener(AsyncTLSListener):
    """Records handshake errors (after the default handling) instead of failing."""

    errors: list[tuple[BaseException, Any]]
    event: anyio.Event

    async def handle_handshake_error(  # type: ignore[override]
            self, exc: BaseException, stream: Any) -> None:
        try:
            await AsyncTLSListener.handle_handshake_error(exc, stream)
        finally:
            self.errors.append((exc, stream))
            self.event.set()


def recording_listener(inner: Any, sctx: A.TLSContext, **kw: Any) -> RecordingListener:
    listener = RecordingListener(inner, sctx, **kw)
    listener.errors = []
    listener.event = anyio.Event()
    return listener


async def _echo_handler(stream: AsyncTLSStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive())
        except (EndOfStream, BrokenResourceError):
            pass


async def test_listener_survives_handshake_errors(pki: Pki, caplog: pytest.LogCaptureFixture
                                                  ) -> None:
    caplog.set_level(logging.CRITICAL, logger="anyio_asyncssl.stream")
    with anyio.fail_after(TIMEOUT):
        listener = recording_listener(
            await anyio.create_tcp_listener(local_host="127.0.0.1"), server_ctx(pki))
        assert listener.extra(TLSAttribute.standard_compatible) is True
        addr: Any = listener.listener.extra(SocketAttribute.local_address)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _echo_handler)
            # 1. a client that connects and hangs up at once
            sock = socket.socket()
            sock.connect(addr)
            sock.close()
            await listener.event.wait()
            exc, stream = listener.errors[0]
            assert isinstance(exc, BrokenResourceError)
            assert isinstance(stream, SocketStream)
            # 2. a client that speaks plain HTTP
            listener.event = anyio.Event()
            async with await anyio.connect_tcp(*addr) as plain:
                await plain.send(b"GET / HTTP/1.0\r\n\r\n")
                await listener.event.wait()
            assert isinstance(listener.errors[1][0], ssl.SSLError)
            # 3. a client that does not trust the server
            listener.event = anyio.Event()
            untrusted = A.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect_tcp(addr[0], addr[1], context=untrusted, hostname="localhost")
            await listener.event.wait()
            assert len(listener.errors) == 3
            # the listener still serves
            async with await connect_tcp(addr[0], addr[1], context=client_ctx(pki),
                                         hostname="localhost") as good:
                await good.send(b"still there")
                assert await good.receive() == b"still there"
            tg.cancel_scope.cancel()


async def test_listener_handshake_timeout(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="anyio_asyncssl.stream")
    with anyio.fail_after(TIMEOUT):
        listener = recording_listener(
            await anyio.create_tcp_listener(local_host="127.0.0.1"), server_ctx(pki),
            handshake_timeout=0.3)
        addr: Any = listener.listener.extra(SocketAttribute.local_address)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _echo_handler)
            async with await anyio.connect_tcp(*addr) as silent:
                await listener.event.wait()
                assert isinstance(listener.errors[0][0], TimeoutError)
                # the server closed the connection
                with pytest.raises((EndOfStream, BrokenResourceError)):
                    await silent.receive()
            async with await connect_tcp(addr[0], addr[1], context=client_ctx(pki),
                                         hostname="localhost") as good:
                await good.send(b"in time")
                assert await good.receive() == b"in time"
            tg.cancel_scope.cancel()


async def test_listener_serves_concurrent_clients(pki: Pki, engine: TestEngine,
                                                  offload: A.Offload) -> None:
    engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload)
    with anyio.fail_after(TIMEOUT):
        listener = AsyncTLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"),
                                    sctx)
        port = listener.listener.extra(SocketAttribute.local_port)
        done: list[int] = []

        async def client(i: int) -> None:
            async with await connect_tcp("127.0.0.1", port, context=client_ctx(pki),
                                         hostname="localhost") as stream:
                payload = f"client {i}".encode() * 1000
                await stream.send(payload)
                assert await receive_exactly(stream, len(payload)) == payload
            done.append(i)

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _echo_handler)
            async with anyio.create_task_group() as clients:
                for i in range(12):
                    clients.start_soon(client, i)
            tg.cancel_scope.cancel()
        assert sorted(done) == list(range(12))
    assert offload.stats().sign_ops >= 12


async def test_listener_against_a_blocking_stdlib_client_thread(pki: Pki) -> None:
    ssl_ctx = stdlib_client_ctx(pki)

    def client_sync(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                ssl_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"hello from a thread")
            data = b""
            while len(data) < 19:
                data += tls.recv(100)
            tls.unwrap()
            return data

    with anyio.fail_after(TIMEOUT):
        listener = AsyncTLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"),
                                    server_ctx(pki))
        port = listener.listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _echo_handler)
            got = await anyio.to_thread.run_sync(client_sync, port)
            tg.cancel_scope.cancel()
    assert got == b"hello from a thread"


async def test_listener_default_handler_logs(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(TIMEOUT):
        listener = AsyncTLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"),
                                    server_ctx(pki))
        addr: Any = listener.listener.extra(SocketAttribute.local_address)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _echo_handler)
            sock = socket.socket()
            sock.connect(addr)
            sock.close()
            while not any("Error during TLS handshake" in r.message for r in caplog.records):
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


# ==================================================================================
# TLS in TLS, send_eof, sessions
# ==================================================================================
@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
async def test_tls_in_tls(pki: Pki, engine: TestEngine, offload: A.Offload,
                          transport: str) -> None:
    """trio's test_ssl_over_ssl: an AsyncTLSStream as the transport of another."""
    engine.set(latency_ms=2)
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport) as (outer_client, outer_server):
            inner_client, inner_server = await tls_pair(
                outer_client, outer_server, client_ctx(pki),
                server_ctx(pki, "ec", offload=offload, version=V12))
            assert inner_client.transport_stream is outer_client
            assert inner_client.extra(TLSAttribute.tls_version) == "TLSv1.2"
            assert outer_client.extra(TLSAttribute.tls_version) == "TLSv1.3"
            for size in (1, 5000, 100_000):
                await echo_once(inner_client, inner_server, os.urandom(size))
            # the inner close_notify travels through the outer TLS
            async with anyio.create_task_group() as tg:
                tg.start_soon(inner_server.aclose)
                await inner_client.aclose()
            with pytest.raises(ClosedResourceError):
                await outer_client.receive()


async def test_send_eof_tls13_half_close(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, "tcp", version=V13) as (client, server):
            await client.send(b"request")
            await client.send_eof()
            assert await receive_exactly(server, 7) == b"request"
            with pytest.raises(EndOfStream):
                await server.receive()
            # the other direction still works
            await server.send(b"response")
            assert await receive_exactly(client, 8) == b"response"
            with pytest.raises(ClosedResourceError):
                await client.send(b"after eof")
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                with pytest.raises(EndOfStream):
                    await client.receive()
                await client.aclose()


async def test_send_eof_twice_is_harmless(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, version=V13) as (client, server):
            await client.send_eof()
            await client.send_eof()
            with pytest.raises(EndOfStream):
                await server.receive()


@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_aclose_ends_when_a_concurrent_receive_takes_the_peers_close_notify(
        pki: Pki, transport: str, version: ssl.TLSVersion) -> None:
    """Each side closes while its own receive waits.  When the receive takes the
    peer's close_notify, the close, waiting behind it to read, must see it and
    not wait on the transport for bytes that already came (on the memory-BIO
    path it did, on both sides, and neither ever closed).  When the close takes
    it, the receive finds its stream closed under it."""
    ends: list[str] = []

    async def receive_until_the_end(name: str, stream: AsyncTLSStream) -> None:
        with pytest.raises((EndOfStream, ClosedResourceError, BrokenResourceError)):
            await stream.receive()
        ends.append(f"{name} receive ended")

    async def close(name: str, stream: AsyncTLSStream, send_eof_first: bool) -> None:
        if send_eof_first:
            await stream.send_eof()
        await stream.aclose()
        ends.append(f"{name} closed")

    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport, version=version) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_until_the_end, "client", client)
                tg.start_soon(receive_until_the_end, "server", server)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(close, "client", client, False)
                tg.start_soon(close, "server", server, True)
    assert sorted(ends) == ["client closed", "client receive ended",
                            "server closed", "server receive ended"]


@pytest.mark.parametrize("transport", ["tcp", "tcp-membio", "memory"])
async def test_a_receive_and_a_close_waiting_to_read_take_turns_at_receiving(
        pki: Pki, transport: str) -> None:
    """The server's receive gets data while its close waits to read; then both
    want to read again.  Each waits for the other's receive and retries its
    step, and one of them must then receive (deferring to the other whenever
    it had waited for it, each deferred for ever and nobody received)."""
    received: list[bytes] = []

    async def server_receives(server: AsyncTLSStream) -> None:
        with pytest.raises((EndOfStream, ClosedResourceError, BrokenResourceError)):
            while True:
                received.append(await server.receive())

    async def client_sends_then_reads_to_the_end(client: AsyncTLSStream) -> None:
        await client.send(b"request")
        with pytest.raises(EndOfStream):
            await client.receive()
        await client.aclose()

    with anyio.fail_after(TIMEOUT):
        async with connected(pki, transport) as (client, server):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server_receives, server)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(server.aclose)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(client_sends_then_reads_to_the_end, client)
    assert b"".join(received) in (b"", b"request")


async def test_send_eof_tls12_sends_close_notify_and_keeps_receiving(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, version=V12) as (client, server):
            assert client.extra(TLSAttribute.tls_version) == "TLSv1.2"
            await client.send(b"request")
            await client.send_eof()
            with pytest.raises(ClosedResourceError):
                await client.send(b"after eof")
            assert await receive_exactly(server, 7) == b"request"
            with pytest.raises(EndOfStream):
                await server.receive()
            # what the peer sends before its own close_notify still arrives
            await server.send(b"response")
            assert await receive_exactly(client, 8) == b"response"
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                with pytest.raises(EndOfStream):
                    await client.receive()
                await client.aclose()


@pytest.mark.parametrize("version", [V12, V13], ids=["tls12", "tls13"])
async def test_session_resumption(pki: Pki, engine: TestEngine, offload: A.Offload,
                                  version: ssl.TLSVersion) -> None:
    engine.set(latency_ms=2)
    sctx = server_ctx(pki, offload=offload, version=version)
    cctx = client_ctx(pki, version)
    with anyio.fail_after(TIMEOUT):
        async with connected(pki, cctx=cctx, sctx=sctx) as (client, server):
            # TLS 1.3 tickets come after the handshake: exchange data first
            await echo_once(client, server, b"first")
            assert client.extra(AsyncTLSAttribute.session_reused) is False
            full_pauses = server.extra(AsyncTLSAttribute.pauses)
            assert full_pauses >= 1
            session = client.extra(AsyncTLSAttribute.session)
            assert isinstance(session, A.TLSSession)
            assert session.is_resumable
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                await client.aclose()
        async with connected(pki, cctx=cctx, sctx=sctx,
                             client_kw={"session": session}) as (client, server):
            assert client.extra(AsyncTLSAttribute.session_reused) is True
            assert server.extra(AsyncTLSAttribute.session_reused) is True
            # a resumed handshake has no signature to offload
            assert server.extra(AsyncTLSAttribute.pauses) == 0
            await echo_once(client, server, b"second")
        # without the session: a full handshake again
        async with connected(pki, cctx=cctx, sctx=sctx) as (client, server):
            assert client.extra(AsyncTLSAttribute.session_reused) is False


async def test_session_resumption_through_connect_tcp_and_listener(pki: Pki) -> None:
    sctx = server_ctx(pki, version=V13)
    cctx = client_ctx(pki)
    reused: list[bool] = []

    async def handler(stream: AsyncTLSStream) -> None:
        reused.append(stream.extra(AsyncTLSAttribute.session_reused))
        await _echo_handler(stream)

    with anyio.fail_after(TIMEOUT):
        listener = AsyncTLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1"),
                                    sctx)
        port = listener.listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            session = None
            for _ in range(3):
                async with await connect_tcp("127.0.0.1", port, context=cctx,
                                             hostname="localhost", session=session) as stream:
                    await stream.send(b"ticket please")
                    assert await stream.receive() == b"ticket please"
                    assert stream.extra(AsyncTLSAttribute.session_reused) is (session is not None)
                    session = stream.extra(AsyncTLSAttribute.session)
            while len(reused) < 3:
                await anyio.sleep(0.01)
            assert reused == [False, True, True]
            tg.cancel_scope.cancel()


# trio only: asyncio lets a task's BaseException out of the loop (as it does
# KeyboardInterrupt), which would end the test runner's loop
@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("transport", ["tcp", "memory"])
async def test_a_step_interrupted_by_keyboardinterrupt_breaks_the_stream(
        pki: Pki, transport: str) -> None:
    # Ctrl-C (trio delivers KeyboardInterrupt anywhere outside KI protection)
    # can land between OpenSSL's step and the driver's bookkeeping: whatever
    # that step consumed is gone, so the stream must not be used again and
    # closing it must not attempt a closing handshake (it used to fail there
    # with SHUTDOWN_WHILE_IN_INIT, chained onto the KeyboardInterrupt)
    # (a BaseException of its own, as KeyboardInterrupt is one: a real
    # KeyboardInterrupt would stop pytest)
    class Interrupt(BaseException):
        pass

    async with connected(pki, transport) as (client, server):
        conn = server.ssl_object
        real_read = conn.read

        def interrupted_read(*args: Any, **kw: Any) -> Any:
            real_read(*args, **kw)
            raise Interrupt

        conn.read = interrupted_read  # type: ignore[method-assign]
        await client.send(b"lost to Ctrl-C")
        with pytest.raises(Interrupt):
            await server.receive()
        conn.read = real_read  # type: ignore[method-assign]
        with pytest.raises(BrokenResourceError):
            await server.receive()
        await server.aclose()      # no closing handshake, no error
        await anyio.aclose_forcefully(client)   # its peer left without close_notify
