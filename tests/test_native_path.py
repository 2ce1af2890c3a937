"""The native socket path: OpenSSL reads and writes kernel sockets itself.

Which transports take it (anyio's socket streams on both backends,
``trio.SocketStream``) and which keep memory BIOs; that nothing an asyncio
transport had already read is lost when we take its socket over; that many
records come back from one receive; that a send larger than the socket's
buffer works with a slow reader; that a closed transport breaks the stream
without our ever touching its fd number again; and that unwrap hands back
what followed the peer's close_notify.  Every other stream test runs over
TCP (native) and memory streams (memory BIOs) too.
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Any, cast

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketListener, UNIXSocketStream
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSStream

pytestmark = pytest.mark.anyio
TIMEOUT = 20


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _tcp_pair() -> tuple[Any, Any, Any]:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    # anyio types its listeners as plain Listeners; a TCP one is a SocketListener
    listener = cast(SocketListener, multi.listeners[0])
    port = listener.extra(SocketAttribute.local_port)
    client = await anyio.connect_tcp("127.0.0.1", port)
    server = await listener.accept()
    return client, server, multi


async def _wrap_both(ct: Any, st: Any, pki: Pki, **kw: Any) -> tuple[AsyncTLSStream,
                                                                      AsyncTLSStream]:
    out: dict[str, AsyncTLSStream] = {}

    async def server() -> None:
        out["s"] = await AsyncTLSStream.wrap(st, context=pki.server_ctx("ec"),
                                             server_side=True, **kw)

    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        out["c"] = await AsyncTLSStream.wrap(ct, context=pki.client_ctx(),
                                             hostname="localhost", **kw)
    return out["c"], out["s"]


async def test_anyio_socket_streams_take_the_native_path(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi:
            client, server = await _wrap_both(ct, st, pki)
            assert client._driver.sock is not None and server._driver.sock is not None
            await client.send(b"ping")
            assert await server.receive() == b"ping"
            # nothing went through the memory BIOs
            assert client._conn.bytes_to_send() == b""
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.aclose)
                await client.aclose()
        a, b = socket.socketpair()
        async with await UNIXSocketStream.from_socket(a) as ua, \
                await UNIXSocketStream.from_socket(b) as ub:
            client, server = await _wrap_both(ua, ub, pki)
            assert client._driver.sock is not None
            await server.send(b"pong")
            assert await client.receive() == b"pong"


async def test_native_socket_false_keeps_memory_bios(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi, ct, st:
            client, server = await _wrap_both(ct, st, pki, native_socket=False)
            assert client._driver.sock is None and server._driver.sock is None
            await client.send(b"ping")
            assert await server.receive() == b"ping"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bytes_the_asyncio_transport_read_before_the_takeover_are_kept(
        pki: Pki, anyio_backend: str) -> None:
    """The ClientHello (and a first record) arrive before the server wraps its stream."""
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi:
            async with anyio.create_task_group() as tg:
                got: list[bytes] = []

                async def client_side() -> None:
                    client = await AsyncTLSStream.wrap(ct, context=pki.client_ctx(),
                                                       hostname="localhost")
                    await client.send(b"early data")
                    got.append(await client.receive())
                    await client.aclose()

                tg.start_soon(client_side)
                # let the transport read the ClientHello into its own buffer
                while not st._protocol.read_queue:
                    await anyio.sleep(0.001)
                server = await AsyncTLSStream.wrap(st, context=pki.server_ctx("ec"),
                                                   server_side=True)
                assert server._driver.sock is not None
                assert await server.receive() == b"early data"
                await server.send(b"answer")
                with pytest.raises(anyio.EndOfStream):
                    await server.receive()
                await server.aclose()
            assert got == [b"answer"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "membio"])
async def test_one_receive_returns_every_record_that_arrived(pki: Pki, native: bool) -> None:
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi, ct, st:
            client, server = await _wrap_both(ct, st, pki, native_socket=native)
            payload = os.urandom(48 * 1024)   # three full records
            await client.send(payload)
            await anyio.sleep(0.05)          # all of it arrives first
            got = await server.receive(65536)
            assert len(got) > 16384          # more than one record in one call
            got += await _exactly(server, len(payload) - len(got))
            assert got == payload


async def _exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive()
    return bytes(buf)


async def test_a_send_larger_than_the_socket_buffers_with_a_slow_reader(pki: Pki) -> None:
    """The socket fills (WANT_WRITE), the sender waits for writability, nothing is lost.

    (Loopback's buffers are left alone: shrunk below its 64 KiB MSS, TCP
    itself stalls on its persist timer.)
    """
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi, ct, st:
            client, server = await _wrap_both(ct, st, pki)
            payload = os.urandom(16 * 1024 * 1024)
            received = bytearray()

            async def slow_reader() -> None:
                while len(received) < len(payload):
                    received.extend(await server.receive(4096))
                    if len(received) % (64 * 1024) < 4096:
                        await anyio.sleep(0.001)

            waits = client._driver.io_events
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_reader)
                await client.send(payload)
            assert client._driver.io_events > waits   # the sender did wait for room
            assert bytes(received) == payload


async def test_a_transport_closed_under_the_stream_breaks_it(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi:
            client, server = await _wrap_both(ct, st, pki)
            await client.send(b"x")
            assert await server.receive() == b"x"
            await anyio.aclose_forcefully(st)
            # the number may now belong to anything: never touched again
            with pytest.raises(anyio.BrokenResourceError):
                await server.send(b"y")
            assert server._driver.sock is not None and not server._driver.sock.alive
            # and the peer sees the connection go
            with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                for _ in range(100):
                    await client.send(b"z" * 16384)
                await client.receive()
            await anyio.aclose_forcefully(client)


async def test_unwrap_hands_back_what_followed_close_notify(pki: Pki) -> None:
    """STARTTLS downgrade: plaintext right after the peer's close_notify is not lost."""
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi:
            client, server = await _wrap_both(ct, st, pki)
            assert client._driver.sock is not None
            async with anyio.create_task_group() as tg:
                async def server_side() -> None:
                    raw, trailing = await server.unwrap()
                    await raw.send(b"PLAIN AGAIN")
                    assert trailing == b""

                tg.start_soon(server_side)
                raw, trailing = await client.unwrap()
            rest = trailing
            while len(rest) < 11:
                rest += await raw.receive()
            assert rest == b"PLAIN AGAIN"
            await raw.aclose()
            await st.aclose()


async def test_a_transport_kept_after_unwrap_does_not_keep_the_tls_connection(
        pki: Pki) -> None:
    """The SSL object goes with the TLS stream, not with the transport it was over.

    On asyncio our hook on the transport's protocol (it closes our dup of the
    fd) kept the connection through the socket's close callback: a server
    that kept a transport (anyio's listener keeps the last one it accepted),
    or a STARTTLS downgrade that goes on in plaintext, kept an SSL object
    alive per transport (the soak's counters never came back).
    """
    with anyio.fail_after(TIMEOUT):
        ct, st, multi = await _tcp_pair()
        async with multi:
            gc.collect()
            baseline = A.connection_counters()["live"]
            client, server = await _wrap_both(ct, st, pki)
            assert client._driver.sock is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.unwrap)
                await client.unwrap()
            del client, server
            gc.collect()
            assert A.connection_counters()["live"] == baseline
            await ct.send(b"plain")         # the transports are still the caller's
            assert await st.receive() == b"plain"
            await ct.aclose()
            await st.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_socket_streams_take_the_native_path(pki: Pki, anyio_backend: str) -> None:
    import trio

    from anyio_asyncssl.trio import TrioTLSStream

    a, b = trio.socket.socketpair()
    ca, sb = trio.SocketStream(a), trio.SocketStream(b)
    client = TrioTLSStream(ca, pki.client_ctx(), server_hostname="localhost")
    server = TrioTLSStream(sb, pki.server_ctx("ec"), server_side=True)
    assert client._driver.sock is not None and server._driver.sock is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    await client.send_all(b"hello")
    assert await server.receive_some() == b"hello"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


def test_ktls_is_reported_when_the_kernel_offers_it() -> None:
    """kTLS needs the kernel's tls ULP (absent on the development machine)."""
    from anyio_asyncssl.sockets import kernel_tls_available

    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            offered = "tls" in f.read().split()
    except OSError:
        offered = False
    assert kernel_tls_available() == offered
