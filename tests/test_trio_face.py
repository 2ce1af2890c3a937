"""The trio face: TrioTLSStream / TrioTLSListener under plain ``trio.run``."""

from __future__ import annotations

import gc
import os
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.testing import TestEngine, cipher_counters
from anyio_asyncssl.trio import (
    TrioTLSListener,
    TrioTLSStream,
    open_tls_over_tcp_listeners,
    open_tls_over_tcp_stream,
    serve_tls_over_tcp,
)

Pair = tuple[TrioTLSStream[Any], TrioTLSStream[Any]]


def run(main: Callable[[], Awaitable[object]], timeout: float = 60) -> None:
    """trio.run with a generous global deadline (the machine is shared)."""

    async def bounded() -> None:
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


def memory_pair(client_ctx: A.TLSContext, server_ctx: A.TLSContext, *,
                lockstep: bool = False, https_compatible: bool = False,
                client_kw: dict[str, Any] | None = None,
                server_kw: dict[str, Any] | None = None) -> Pair:
    ct: trio.abc.Stream
    st: trio.abc.Stream
    if lockstep:
        ct, st = trio.testing.lockstep_stream_pair()
    else:
        ct, st = trio.testing.memory_stream_pair()
    client = TrioTLSStream(ct, client_ctx, server_hostname="localhost",
                           **{"https_compatible": https_compatible, **(client_kw or {})})
    server = TrioTLSStream(st, server_ctx, server_side=True,
                           **{"https_compatible": https_compatible, **(server_kw or {})})
    return client, server


async def handshake_both(client: TrioTLSStream[Any], server: TrioTLSStream[Any]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


def tls12(ctx: A.TLSContext) -> A.TLSContext:
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def port_of(listener: TrioTLSListener[trio.SocketStream]) -> int:
    tcp = listener.transport_listener
    assert isinstance(tcp, trio.SocketListener)
    port: int = tcp.socket.getsockname()[1]
    return port


async def echo_handler(stream: TrioTLSStream[Any]) -> None:
    async with stream:
        while True:
            data = await stream.receive_some()
            if not data:
                return
            await stream.send_all(data)


async def recv_exactly(stream: TrioTLSStream[Any], n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


# -- echo over loopback TCP -------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("offloaded", [True, False], ids=["offload", "inline"])
def test_echo_over_loopback_tcp(pki: Pki, offload: A.Offload, engine: TestEngine,
                                kind: str, offloaded: bool) -> None:
    sctx = pki.server_ctx(kind, offload=offload if offloaded else None)
    cctx = pki.client_ctx()
    payload = os.urandom(300_000)
    server_streams: list[TrioTLSStream[Any]] = []
    before = offload.stats().submitted

    async def handler(stream: TrioTLSStream[Any]) -> None:
        server_streams.append(stream)
        await echo_handler(stream)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve_tls_over_tcp, host="127.0.0.1"), handler, 0, sctx)
            port = port_of(listeners[0])
            client = await open_tls_over_tcp_stream("127.0.0.1", port, context=cctx)
            async with client:
                for message in (b"x", b"hello" * 1000, payload):
                    await client.send_all(message)
                    assert await recv_exactly(client, len(message)) == message
                assert client.version() == "TLSv1.3"
                assert client.getpeercert()["subjectAltName"]
            nursery.cancel_scope.cancel()

    run(main)
    assert len(server_streams) == 1
    server = server_streams[0]
    if offloaded:  # signed on a worker (the job may not even pause if the worker is fast)
        assert offload.stats().submitted == before + 1
        assert server.async_stats()["callbacks_on_worker"] == 1
    else:
        assert offload.stats().submitted == before
        assert server.pauses == 0 and server.async_stats()["wakeups"] == 0


# -- the generic trio stream conformance suites ------------------------------------
# trio.testing's own checks for Stream/HalfCloseableStream implementations:
# checkpoints, BusyResourceError, ClosedResourceError, cancellation, aclose
# while blocked, 1 MiB full duplex ...  With record pauses, every read, write
# and close_notify of the server pauses on the engine as well.
@pytest.mark.parametrize("record_pauses", [False, True], ids=["handshake-offload", "all-paused"])
@pytest.mark.parametrize("https_compatible", [False, True], ids=["standard", "https"])
def test_trio_generic_two_way_stream_checks(pki: Pki, offload: A.Offload, engine: TestEngine,
                                            https_compatible: bool, record_pauses: bool) -> None:
    sctx = pki.server_ctx("ec", offload=offload)
    if record_pauses:
        engine.enable_record_pauses(sctx)
    cctx = pki.client_ctx()
    engine.set(latency_ms=0.5)

    async def stream_maker() -> Pair:
        return memory_pair(cctx, sctx, https_compatible=https_compatible)

    async def clogged_stream_maker() -> Pair:
        client, server = memory_pair(cctx, sctx, lockstep=True)
        await handshake_both(client, server)
        return client, server

    run(lambda: trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker), 120)


@pytest.mark.parametrize("record_pauses", [False, True], ids=["handshake-offload", "all-paused"])
def test_trio_generic_half_closeable_checks_on_tls13(pki: Pki, offload: A.Offload,
                                                     engine: TestEngine,
                                                     record_pauses: bool) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    if record_pauses:
        engine.enable_record_pauses(sctx)
    cctx = pki.client_ctx()

    async def stream_maker() -> Pair:
        return memory_pair(cctx, sctx)

    async def clogged_stream_maker() -> Pair:
        client, server = memory_pair(cctx, sctx, lockstep=True)
        await handshake_both(client, server)
        return client, server

    run(lambda: trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker),
        120)


# -- lazy handshake, forwarded attributes ---------------------------------------------
def test_handshake_is_lazy_and_runs_once_for_concurrent_callers(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    cctx = pki.client_ctx()
    cctx.set_alpn_protocols(["http/1.1"])
    engine.set(latency_ms=2)
    before = offload.stats().submitted

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await trio.testing.wait_all_tasks_blocked()
        for stream in (client, server):  # nothing happened yet
            assert not stream.ssl_object.handshake_done
            assert stream.ssl_object.bytes_to_send() == b""
            with pytest.raises(trio.NeedHandshakeError):
                stream.version()
            with pytest.raises(trio.NeedHandshakeError):
                stream.getpeercert()
            with pytest.raises(trio.NeedHandshakeError):
                stream.selected_alpn_protocol()
            with pytest.raises(trio.NeedHandshakeError):
                _ = stream.session_reused
        assert client.server_hostname == "localhost" and not client.server_side
        assert server.server_side and server.context is sctx

        received: list[bytes] = []

        async def server_receive() -> None:
            received.append(await recv_exactly(server, 5))

        async with trio.open_nursery() as nursery:
            # the first send runs the handshake; the others wait for that one
            nursery.start_soon(client.send_all, b"hello")
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server_receive)
            nursery.start_soon(server.do_handshake)
        assert received == [b"hello"]
        await client.do_handshake()  # done: just a checkpoint

        assert offload.stats().submitted == before + 1  # one handshake, one signature
        for stream in (client, server):
            assert stream.version() == "TLSv1.3"
            assert stream.selected_alpn_protocol() == "http/1.1"
            cipher = stream.cipher()
            assert cipher is not None and cipher[1] == "TLSv1.3"
            assert stream.session_reused is False
            assert stream.compression() is None
        assert dict(x[0] for x in client.getpeercert()["subject"])["organizationName"]
        assert isinstance(client.getpeercert(binary_form=True), bytes)
        assert server.getpeercert() is None  # no client certificate
        shared = server.shared_ciphers()
        assert shared and all(len(c) == 3 for c in shared)
        assert client.session is not None
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()

    run(main)


def test_reads_from_buffered_plaintext_are_still_checkpoints(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("ec"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        await client.send_all(b"abc")  # one record
        for expected in (b"a", b"b", b"c"):  # the last two need no transport I/O
            with trio.testing.assert_checkpoints():
                assert await server.receive_some(1) == expected
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send_all(b"d")  # cancelled before it started: nothing sent
        assert scope.cancelled_caught
        await client.send_all(b"e")  # and the stream is still usable
        assert await server.receive_some() == b"e"
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    run(main)


def test_client_without_server_hostname_is_refused(pki: Pki) -> None:
    ct, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="server_hostname"):
        TrioTLSStream(ct, pki.client_ctx())


def test_session_tickets_are_held_back_then_resume(pki: Pki, offload: A.Offload) -> None:
    # The TLS 1.3 server's tickets wait for its first send (as in trio.SSLStream);
    # they still arrive, and resume the next connection without a signature.
    sctx, cctx = pki.server_ctx("rsa", offload=offload), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        await server.send_all(b"hi")  # carries the tickets
        assert await client.receive_some() == b"hi"
        session = client.session
        assert session is not None and session.is_resumable
        async with trio.open_nursery() as nursery:  # a clean close keeps it resumable
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
        await server.aclose()

        before = offload.stats().submitted
        ct, st = trio.testing.memory_stream_pair()
        client = TrioTLSStream(ct, cctx, server_hostname="localhost", session=session)
        server = TrioTLSStream(st, sctx, server_side=True)
        await handshake_both(client, server)
        assert client.session_reused and server.session_reused
        assert offload.stats().submitted == before  # no private-key operation
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    run(main)


# -- BusyResourceError / ClosedResourceError ---------------------------------------------
def test_concurrent_receive_or_send_is_busy_and_leaves_stream_usable(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("ec"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx, lockstep=True)
        await handshake_both(client, server)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)  # blocks: nothing was sent
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            with pytest.raises(trio.BusyResourceError):
                await server.unwrap()
            nursery.cancel_scope.cancel()  # a cancelled receive leaves the stream usable

        async with trio.open_nursery() as nursery:
            # a lockstep transport blocks send_all until the peer receives
            nursery.start_soon(client.send_all, b"x" * 100)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.send_all(b"y")
            with pytest.raises(trio.BusyResourceError):
                await client.wait_send_all_might_not_block()
            with pytest.raises(trio.BusyResourceError):
                await client.send_eof()
            assert await recv_exactly(server, 100) == b"x" * 100

        async with trio.open_nursery() as nursery:  # still fine both ways
            nursery.start_soon(client.send_all, b"ping")
            assert await recv_exactly(server, 4) == b"ping"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"pong")
            assert await recv_exactly(client, 4) == b"pong"
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    run(main)


def test_everything_raises_closed_after_aclose(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("rsa"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        client_transport = client.transport_stream
        await handshake_both(client, server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""  # close_notify: a clean EOF
            assert await server.receive_some() == b""
        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: client.send_all(b"x"),
            lambda: client.send_all(b""),
            lambda: client.receive_some(),
            lambda: client.do_handshake(),
            lambda: client.unwrap(),
            lambda: client.send_eof(),
            lambda: client.wait_send_all_might_not_block(),
        ]
        for op in operations:
            with pytest.raises(trio.ClosedResourceError):
                await op()
        with trio.testing.assert_checkpoints():
            await client.aclose()  # closing again is fine
        with pytest.raises(trio.ClosedResourceError):  # the transport is closed too
            await client_transport.send_all(b"raw")
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()

    run(main)


def test_aclose_wakes_a_blocked_receiver_with_closed(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("rsa"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        outcome: list[BaseException] = []

        async def receiver() -> None:
            try:
                await client.receive_some()
            except trio.ClosedResourceError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await trio.aclose_forcefully(client)
        assert len(outcome) == 1
        await server.aclose()

    run(main)


def test_a_native_socket_closed_under_the_stream_is_a_trio_error(pki: Pki) -> None:
    """OpenSSL reads the socket itself; the driver finds it closed: trio's vocabulary.

    The driver raises anyio's ClosedResourceError when the socket was closed
    under a step; that escaped TrioTLSStream as is (it killed hypercorn's
    server when a connection closed during a read).
    """
    sctx, cctx = pki.server_ctx("rsa"), pki.client_ctx()

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = TrioTLSStream(await trio.open_tcp_stream("127.0.0.1", port), cctx,
                               server_hostname="localhost")
        server = TrioTLSStream(await listeners[0].accept(), sctx, server_side=True)
        await handshake_both(client, server)
        client.transport_stream.socket.close()   # not through the stream
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
        await listeners[0].aclose()

    run(main)


# -- EOF handling: https_compatible --------------------------------------------------------
@pytest.mark.parametrize("https_compatible", [True, False], ids=["https", "standard"])
def test_ragged_eof_is_eof_only_when_https_compatible(pki: Pki, https_compatible: bool) -> None:
    sctx, cctx = pki.server_ctx("rsa"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx, https_compatible=https_compatible)
        await handshake_both(client, server)
        await client.send_all(b"last words")
        await trio.aclose_forcefully(client)  # closes the transport: no close_notify
        assert await recv_exactly(server, 10) == b"last words"
        if https_compatible:
            assert await server.receive_some() == b""
        else:
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.receive_some()
            assert isinstance(info.value.__cause__, ssl.SSLEOFError)
            assert isinstance(info.value.__cause__, A.TLSEOFError)
        # as in trio, the stream is broken afterwards either way
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        await server.aclose()

    run(main)


def test_https_compatible_aclose_sends_no_close_notify(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("rsa"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx, client_kw={"https_compatible": True})
        await handshake_both(client, server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)  # just closes the transport
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.receive_some()  # the standard side sees a truncation
            assert isinstance(info.value.__cause__, ssl.SSLEOFError)
        await server.aclose()

        # https on both sides: EOF before the handshake is a clean EOF too
        client, server = memory_pair(cctx, sctx, https_compatible=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
        await server.aclose()

        # standard: aclose before the handshake does the handshake, then close_notify
        client, server = memory_pair(cctx, sctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
        await server.aclose()

    run(main)


# -- failures become BrokenResourceError ----------------------------------------------------
@pytest.mark.parametrize("problem", ["untrusted-ca", "wrong-hostname"])
def test_failed_handshake_is_broken_resource_with_ssl_cause(pki: Pki, offload: A.Offload,
                                                            problem: str) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    if problem == "untrusted-ca":
        cctx, hostname = A.create_default_context(), "localhost"  # system CAs only
    else:
        cctx, hostname = pki.client_ctx(), "not-in-the-certificate.example"

    async def main() -> None:
        ct, st = trio.testing.memory_stream_pair()
        client = TrioTLSStream(ct, cctx, server_hostname=hostname)
        server = TrioTLSStream(st, sctx, server_side=True)
        causes: dict[str, BaseException | None] = {}

        async def waiter() -> None:  # waits for the other task's handshake
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BrokenResourceError):
                await client.do_handshake()

        async def run_client() -> None:
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.send_all(b"x")
            causes["client"] = info.value.__cause__

        async def run_server() -> None:
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.receive_some()
            causes["server"] = info.value.__cause__

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_client)
            nursery.start_soon(waiter)
            nursery.start_soon(run_server)
        cause = causes["client"]
        assert isinstance(cause, A.CertificateVerifyError)
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert cause.reason == "CERTIFICATE_VERIFY_FAILED"
        assert cause.verify_code == (20 if problem == "untrusted-ca" else 62)
        assert isinstance(causes["server"], ssl.SSLError)  # the client's alert
        for stream in (client, server):  # broken for good, and aclose just closes
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
            with pytest.raises(trio.BrokenResourceError):
                await stream.do_handshake()
            await stream.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")

    run(main)


def test_handshake_failure_inside_aclose_is_raised(pki: Pki) -> None:
    sctx = pki.server_ctx("rsa")

    async def main() -> None:
        client, server = memory_pair(A.create_default_context(), sctx)  # untrusted CA

        async def server_side() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await server.do_handshake()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            # aclose handshakes to be able to send close_notify: that fails, as in trio
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.aclose()
            assert isinstance(info.value.__cause__, A.CertificateVerifyError)
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        await server.aclose()

    run(main)


@pytest.mark.parametrize("direction", ["send", "receive"])
def test_transport_errors_become_broken_resource(pki: Pki, direction: str) -> None:
    sctx, cctx = pki.server_ctx("ec"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        error = ConnectionResetError(104, "reset by the test")

        async def fail() -> None:
            raise error

        if direction == "send":
            client.transport_stream.send_stream.send_all_hook = fail
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.send_all(b"x")
        else:
            client.transport_stream.receive_stream.receive_some_hook = fail
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.receive_some()
        assert info.value.__cause__ is error
        with pytest.raises(trio.BrokenResourceError):  # stays broken
            await client.wait_send_all_might_not_block()
        await client.aclose()
        await trio.aclose_forcefully(server)

    run(main)


def test_transport_broken_resource_is_chained(pki: Pki) -> None:
    sctx, cctx = pki.server_ctx("ec"), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        await server.transport_stream.aclose()  # the client's sends now hit a closed peer
        with pytest.raises(trio.BrokenResourceError) as info:
            for _ in range(10):
                await client.send_all(b"x" * 1000)
        assert isinstance(info.value.__cause__, trio.BrokenResourceError)
        await client.aclose()

    run(main)


# -- unwrap, send_eof --------------------------------------------------------------------------
def test_unwrap_returns_transport_and_trailing_bytes(pki: Pki, offload: A.Offload) -> None:
    sctx, cctx = pki.server_ctx("rsa", offload=offload), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        client_transport = client.transport_stream
        server_transport = server.transport_stream
        seq = trio.testing.Sequencer()

        async def client_side() -> None:
            await client.do_handshake()
            await client.send_all(b"x")
            assert await client.receive_some(1) == b"y"
            await client.send_all(b"z")
            # hold back what we send, so the server gets our close_notify and the
            # plaintext that follows it in one lump
            async with seq(0):
                hook = client_transport.send_stream.send_all_hook
                client_transport.send_stream.send_all_hook = None
            assert await client.receive_some(1) == b""  # the server's close_notify
            raw, trailing = await client.unwrap()
            assert raw is client_transport and trailing == b""
            assert client.transport_stream is None
            await raw.send_all(b"trailing")
            client_transport.send_stream.send_all_hook = hook
            assert hook is not None
            await hook()

        async def server_side() -> None:
            await server.do_handshake()
            assert await server.receive_some(1) == b"x"
            await server.send_all(b"y")
            assert await server.receive_some(1) == b"z"
            async with seq(1):
                raw, trailing = await server.unwrap()
            assert raw is server_transport
            assert trailing == b"trailing"
            with pytest.raises(trio.ClosedResourceError):
                await server.send_all(b"no longer TLS")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(server_side)
        await client_transport.aclose()
        await server_transport.aclose()

    run(main)


def test_send_eof_is_a_tls13_half_close(pki: Pki, offload: A.Offload) -> None:
    sctx, cctx = pki.server_ctx("rsa", offload=offload), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        await client.send_all(b"request")
        await client.send_eof()
        await client.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        assert client.version() == "TLSv1.3"
        assert await recv_exactly(server, 7) == b"request"
        assert await server.receive_some() == b""
        for i in range(3):  # the other direction still works
            await server.send_all(b"response %d;" % i)
        assert await recv_exactly(client, 33) == b"response 0;response 1;response 2;"
        await server.aclose()
        assert await client.receive_some() == b""
        await client.aclose()

    run(main)


def test_send_eof_on_tls12_sends_close_notify_and_keeps_receiving(pki: Pki) -> None:
    """hypercorn's Connection: close path calls send_eof on TLS 1.2 too: never a crash."""
    sctx, cctx = tls12(pki.server_ctx("ec")), pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        assert client.version() == "TLSv1.2"
        await client.send_all(b"request")
        await client.send_eof()
        await client.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        assert await recv_exactly(server, 7) == b"request"
        assert await server.receive_some() == b""
        # what the peer sends before its own close_notify still arrives
        await server.send_all(b"response")
        await server.aclose()
        assert await recv_exactly(client, 8) == b"response"
        assert await client.receive_some() == b""
        await client.aclose()

    run(main)


def test_send_eof_on_tls12_against_the_stdlib(pki: Pki) -> None:
    """The stdlib peer sees our close_notify as EOF and may answer before its own."""
    import threading

    sctx = tls12(pki.server_ctx("ec"))
    stdlib_ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    seen: list[bytes] = []

    def stdlib_client(port: int) -> None:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                stdlib_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET")
            data = b""
            while chunk := tls.recv(100):   # b"" at our close_notify
                data += chunk
            seen.append(data)
            tls.sendall(b"bye")
            tls.unwrap()

    async def main() -> None:
        listeners = await open_tls_over_tcp_listeners(0, sctx, host="127.0.0.1")
        port = port_of(listeners[0])
        t = threading.Thread(target=stdlib_client, args=(port,))
        t.start()
        try:
            server = await listeners[0].accept()
            assert await recv_exactly(server, 3) == b"GET"
            await server.send_all(b"response")
            await server.send_eof()
            assert await recv_exactly(server, 3) == b"bye"
            assert await server.receive_some() == b""
            await server.aclose()
        finally:
            await listeners[0].aclose()
            await trio.to_thread.run_sync(t.join)
        assert seen == [b"response"]

    run(main)


# -- listeners ------------------------------------------------------------------------------
def test_listener_accept_does_not_handshake(pki: Pki) -> None:
    sctx = pki.server_ctx("rsa")

    async def main() -> None:
        listeners = await open_tls_over_tcp_listeners(0, sctx, host="127.0.0.1")
        assert len(listeners) == 1 and isinstance(listeners[0], TrioTLSListener)
        listener = listeners[0]
        port = port_of(listener)
        async with listener:
            silent = await trio.open_tcp_stream("127.0.0.1", port)  # never speaks TLS
            stream = await listener.accept()  # returns at once: the handshake is lazy
            assert stream.server_side and not stream.ssl_object.handshake_done
            await silent.aclose()
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.do_handshake()
            assert isinstance(info.value.__cause__, ssl.SSLEOFError)
            await stream.aclose()

    run(main)


def test_open_tls_over_tcp_stream_defaults_to_system_cas(pki: Pki) -> None:
    sctx = pki.server_ctx("ec")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve_tls_over_tcp, host="127.0.0.1"), echo_handler, 0, sctx)
            port = port_of(listeners[0])
            stream = await open_tls_over_tcp_stream(b"127.0.0.1", port)  # no context
            assert stream.server_hostname == "127.0.0.1"
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.send_all(b"x")  # our test CA is not a system CA
            assert isinstance(info.value.__cause__, A.CertificateVerifyError)
            await stream.aclose()
            nursery.cancel_scope.cancel()

    run(main)


# -- the must-show: serve_listeners, 100 concurrent clients, clean cancellation -----------------
def test_serve_listeners_serves_100_concurrent_clients_and_cancels_cleanly(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    clients = 100
    late_clients = 10  # still handshaking when the nursery is cancelled
    sctx = pki.server_ctx("rsa", offload=offload)
    cctx = pki.client_ctx()
    engine.set(latency_ms=2)
    gc.collect()
    baseline = A.connection_counters()
    submitted_before = offload.stats().submitted
    active = peak = echoes = 0
    paused_at_cancel: list[int] = []

    async def handler(stream: TrioTLSStream[Any]) -> None:
        nonlocal active, peak, echoes
        active += 1
        peak = max(peak, active)
        try:
            async with stream:
                while data := await stream.receive_some():
                    await stream.send_all(data)
                    echoes += 1
        finally:
            active -= 1

    async def main() -> None:
        echoed = 0
        all_echoed = trio.Event()

        async def client(i: int, port: int) -> None:
            nonlocal echoed
            stream = await open_tls_over_tcp_stream("127.0.0.1", port, context=cctx)
            async with stream:
                message = b"client %03d " % i * 40
                await stream.send_all(message)
                assert await recv_exactly(stream, len(message)) == message
                echoed += 1
                if echoed == clients:
                    all_echoed.set()
                await trio.sleep_forever()  # keep the connection open until cancelled

        async def late_client(port: int) -> None:
            stream = await open_tls_over_tcp_stream("127.0.0.1", port, context=cctx)
            async with stream:
                await stream.do_handshake()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            tcp = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=clients + 20)
            listeners = [TrioTLSListener(listener, sctx) for listener in tcp]
            await nursery.start(trio.serve_listeners, handler, listeners)
            port = tcp[0].socket.getsockname()[1]
            for i in range(clients):
                nursery.start_soon(client, i, port)
            await all_echoed.wait()
            assert active == clients  # every connection is being served at once
            engine.set(latency_ms=20)  # slow signatures: cancel while jobs are paused
            for _ in range(late_clients):
                nursery.start_soon(late_client, port)
            with trio.move_on_after(10):
                while A.connection_counters()["paused_now"] == 0:
                    await trio.sleep(0.001)
            paused_at_cancel.append(A.connection_counters()["paused_now"])
            nursery.cancel_scope.cancel()
        assert active == 0

    run(main, timeout=120)
    assert paused_at_cancel[0] > 0  # the cancellation hit handshakes paused on the engine
    assert offload.stats().in_flight == 0
    assert peak >= clients and echoes >= clients
    assert offload.stats().submitted >= submitted_before + clients  # every handshake offloaded
    gc.collect()
    counters = A.connection_counters()
    assert counters["live"] == baseline["live"], (baseline, counters)
    assert counters["paused_now"] == 0
    assert counters["parked_now"] == baseline["parked_now"]


# -- record pauses: read and write pause too ----------------------------------------------
def test_record_pauses_echo_with_concurrent_sender_and_receiver(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    engine.enable_record_pauses(sctx)
    engine.set(latency_ms=0.1)
    cctx = pki.client_ctx()
    payload = os.urandom(200_000)
    servers: list[TrioTLSStream[Any]] = []
    before = cipher_counters()

    async def full_duplex_echo(stream: TrioTLSStream[Any]) -> None:
        # one task receives, another sends, on the same stream at the same time
        servers.append(stream)
        send_channel, receive_channel = trio.open_memory_channel[bytes](8)

        async def receive_side() -> None:
            async with send_channel:
                while data := await stream.receive_some(5000):
                    await send_channel.send(data)

        async def send_side() -> None:
            async with receive_channel:
                async for data in receive_channel:
                    await stream.send_all(data)

        async with stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_side)
                nursery.start_soon(send_side)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve_tls_over_tcp, host="127.0.0.1"), full_duplex_echo, 0, sctx)
            port = port_of(listeners[0])
            client = await open_tls_over_tcp_stream("127.0.0.1", port, context=cctx)
            got = bytearray()

            async def send_side() -> None:
                view = memoryview(payload)
                while view:
                    await client.send_all(view[:7000])
                    view = view[7000:]

            async def receive_side() -> None:
                while len(got) < len(payload):
                    data = await client.receive_some()
                    assert data
                    got.extend(data)

            async with client:
                async with trio.open_nursery() as inner:
                    inner.start_soon(send_side)
                    inner.start_soon(receive_side)
            assert got == payload
            nursery.cancel_scope.cancel()

    run(main, timeout=120)
    server = servers[0]
    assert server.ssl_object.async_active  # async mode stayed on after the handshake
    assert server.pauses >= 20  # records paused both ways (a few may finish early)
    after = cipher_counters()
    assert after.paused - before.paused >= 2 * (len(payload) // 16384)
    gc.collect()
    assert A.connection_counters()["paused_now"] == 0


def test_cancelled_receive_during_a_paused_read_keeps_the_data(
        pki: Pki, offload: A.Offload, engine: TestEngine) -> None:
    sctx = pki.server_ctx("ec", offload=offload)
    engine.enable_record_pauses(sctx)
    cctx = pki.client_ctx()

    async def main() -> None:
        client, server = memory_pair(cctx, sctx)
        await handshake_both(client, server)
        engine.set(latency_ms=30)  # each record-cipher call now takes 30 ms on a worker
        await client.send_all(b"precious")
        pauses = server.pauses
        got = b""
        start = trio.current_time()
        with trio.move_on_after(0.005):
            got = await server.receive_some()
        # the deadline came while the read's job was paused: the job was finished
        # in a shield (rule 4 of docs/architecture.md), not abandoned
        assert server.pauses > pauses
        assert trio.current_time() - start >= 0.025
        assert server.ssl_object.pending_operation is None
        engine.clear()
        if not got:  # cancelled after the shield: the plaintext was kept for us
            got = await recv_exactly(server, 8)
        assert got == b"precious"
        await server.send_all(b"still fine")
        assert await recv_exactly(client, 10) == b"still fine"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
        await server.aclose()

    run(main)
