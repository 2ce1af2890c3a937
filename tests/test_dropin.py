"""Drop-in names: anyio's and trio's spellings, connectables, and stdlib contexts refused.

The peers are the stock streams (anyio's TLSStream/TLSListener and
trio.SSLStream on the stdlib's ssl), so a spelling that only works against
ourselves proves nothing here.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import pytest
import trio
import trio.testing
from anyio.abc import Listener, SocketAttribute
from anyio.streams.tls import TLSAttribute
from anyio.streams.tls import TLSListener as StockTLSListener
from anyio.streams.tls import TLSStream as StockTLSStream
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl import stream as S
from anyio_asyncssl import trio as T
from anyio_asyncssl.testing import configure_cert, configure_trust

TIMEOUT = 20


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def stdlib_server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.rsa_file)
    return ctx


def stdlib_client_ctx(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


@asynccontextmanager
async def stock_echo_server(pki: Pki, *, standard_compatible: bool = True
                            ) -> AsyncIterator[tuple[int, list[tuple[str, int]]]]:
    """anyio's own TLSListener on the stdlib: echoes one message; records peer addresses."""
    seen: list[tuple[str, int]] = []

    async def handle(stream: StockTLSStream) -> None:
        # a TCP listener: the address is a (host, port) pair, never a UNIX path
        seen.append(cast(tuple[str, int], stream.extra(SocketAttribute.remote_address)))
        async with stream:
            data = await stream.receive()
            await stream.send(data.upper())
            if not standard_compatible:
                await anyio.sleep(0.05)

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(SocketAttribute.local_port)
    listener = StockTLSListener(tcp, stdlib_server_ctx(pki),
                                standard_compatible=standard_compatible)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield port, seen
        tg.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a stdlib context where ours is needed: TypeError at once ---------------------------
def sslctx() -> ssl.SSLContext:
    return ssl.create_default_context()


def assert_recipe(exc: pytest.ExceptionInfo[TypeError]) -> None:
    text = str(exc.value)
    assert "anyio_asyncssl.TLSContext" in text
    assert "not an ssl.SSLContext" in text
    assert "create_default_context" in text and "from anyio_asyncssl import ssl" in text


def test_a_stdlib_context_is_refused_by_the_connection_with_the_recipe() -> None:
    with pytest.raises(TypeError) as exc:
        A.TLSConnection(sslctx(), server_hostname="localhost")  # type: ignore[arg-type]
    assert_recipe(exc)


def test_the_recipe_names_the_side_of_the_stdlib_context() -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TypeError, match=r"Purpose\.CLIENT_AUTH.*PROTOCOL_TLS_SERVER"):
        A.TLSConnection(server, server_side=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Purpose\.SERVER_AUTH.*PROTOCOL_TLS_CLIENT"):
        A.TLSConnection(sslctx(), server_hostname="x")  # type: ignore[arg-type]


def test_anything_else_is_refused_by_its_type_name() -> None:
    with pytest.raises(TypeError, match="not str"):
        A.TLSConnection("cert.pem", server_side=True)  # type: ignore[arg-type]


ANYIO_CONSTRUCTORS: dict[str, Callable[[Any, int], Awaitable[object]]] = {
    "wrap(context=)": lambda c, port: S.AsyncTLSStream.wrap(
        None, context=c),  # type: ignore[arg-type]
    "wrap(ssl_context=)": lambda c, port: S.AsyncTLSStream.wrap(
        None, ssl_context=c, hostname="localhost"),  # type: ignore[arg-type]
    "connect_tcp(ssl_context=)": lambda c, port: S.connect_tcp(
        "127.0.0.1", port, ssl_context=c),
    "connect_tcp(context=)": lambda c, port: S.connect_tcp("127.0.0.1", port, context=c),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(ANYIO_CONSTRUCTORS))
async def test_anyio_face_refuses_a_stdlib_context_before_any_io(name: str) -> None:
    # the port has no listener: an attempt to connect would be an OSError
    with pytest.raises(TypeError) as exc:
        await ANYIO_CONSTRUCTORS[name](sslctx(), free_port())
    assert_recipe(exc)


@pytest.mark.anyio
async def test_anyio_listener_and_connectable_refuse_a_stdlib_context() -> None:
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with tcp:
        for make in (lambda: S.AsyncTLSListener(tcp, sslctx()),  # type: ignore[arg-type]
                     lambda: S.AsyncTLSListener(tcp, ssl_context=sslctx()),  # type: ignore[arg-type]
                     lambda: S.TLSConnectable(anyio.TCPConnectable("127.0.0.1", 1),
                                              ssl_context=sslctx()),  # type: ignore[arg-type]
                     lambda: S.as_connectable(("127.0.0.1", 1), tls=True,
                                              ssl_context=sslctx())):  # type: ignore[arg-type]
            with pytest.raises(TypeError) as exc:
                make()
            assert_recipe(exc)


def test_trio_face_refuses_a_stdlib_context_before_any_io() -> None:
    async def main() -> None:
        port = free_port()
        a, _b = trio.testing.memory_stream_pair()
        cases: list[Callable[[], object]] = [
            lambda: T.TrioTLSStream(a, sslctx(), server_hostname="x"),  # type: ignore[arg-type]
            lambda: T.SSLStream(a, ssl_context=sslctx(),  # type: ignore[arg-type]
                                server_hostname="x"),
            lambda: T.TrioTLSListener(None, sslctx()),  # type: ignore[arg-type]
            lambda: T.SSLListener(None, ssl_context=sslctx()),  # type: ignore[arg-type]
        ]
        for make in cases:
            with pytest.raises(TypeError) as exc:
                make()
            assert_recipe(exc)
        with pytest.raises(TypeError) as exc:
            await T.open_ssl_over_tcp_stream("127.0.0.1", port,
                                             ssl_context=sslctx())  # type: ignore[arg-type]
        assert_recipe(exc)
        with pytest.raises(TypeError) as exc:   # before binding the port
            await T.open_ssl_over_tcp_listeners(port, sslctx())  # type: ignore[arg-type]
        assert_recipe(exc)

        async def never_called(stream: T.SSLStream[trio.SocketStream]) -> None:
            pass   # the context is refused before anything is served

        with pytest.raises(TypeError) as exc:
            await T.serve_ssl_over_tcp(never_called, port,
                                       ssl_context=sslctx())  # type: ignore[arg-type]
        assert_recipe(exc)
        with socket.socket() as s:   # the port was never bound
            s.bind(("127.0.0.1", port))

    trio.run(main)


def test_both_spellings_of_one_keyword_are_a_type_error(pki: Pki) -> None:
    ctx = pki.client_ctx()

    async def main() -> None:
        with pytest.raises(TypeError, match="not both"):
            await S.connect_tcp("127.0.0.1", 1, context=ctx, ssl_context=ctx)
        with pytest.raises(TypeError, match="not both"):
            await S.connect_tcp("127.0.0.1", 1, hostname="a", tls_hostname="b")
        with pytest.raises(TypeError, match="not both"):
            await S.connect_tcp("127.0.0.1", 1, standard_compatible=True,
                                tls_standard_compatible=False)
        with pytest.raises(TypeError, match="not both"):
            T.SSLListener(None, ctx, ssl_context=ctx)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="plain TCP"):
            await S.connect_tcp("127.0.0.1", 1, tls=False)

    anyio.run(main)


# -- anyio's spellings, against anyio's own TLS on the stdlib ---------------------------
@pytest.mark.anyio
async def test_connect_tcp_takes_anyios_keywords(pki: Pki) -> None:
    local_port = free_port()
    with anyio.fail_after(TIMEOUT):
        async with stock_echo_server(pki, standard_compatible=False) as (port, seen):
            stream = await S.connect_tcp(
                "127.0.0.1", port, tls=True, ssl_context=pki.client_ctx(),
                tls_hostname="localhost", tls_standard_compatible=False,
                local_host="127.0.0.1", local_port=local_port, happy_eyeballs_delay=0.1)
            async with stream:
                assert isinstance(stream, S.TLSStream)
                assert stream.extra(TLSAttribute.standard_compatible) is False
                assert stream.extra(SocketAttribute.local_port) == local_port
                await stream.send(b"hello")
                assert await stream.receive() == b"HELLO"
            assert seen == [("127.0.0.1", local_port)]


@pytest.mark.anyio
async def test_connect_tcp_checks_tls_hostname_against_the_certificate(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with stock_echo_server(pki) as (port, _):
            with pytest.raises(A.CertificateVerifyError):
                await S.connect_tcp("127.0.0.1", port, ssl_context=pki.client_ctx(),
                                    tls_hostname="not-in-the-cert.test")


@pytest.mark.anyio
async def test_wrap_takes_anyios_keywords(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with stock_echo_server(pki) as (port, _):
            tcp = await anyio.connect_tcp("127.0.0.1", port)
            stream = await S.TLSStream.wrap(tcp, server_side=False, hostname="localhost",
                                            ssl_context=pki.client_ctx(),
                                            standard_compatible=True)
            async with stream:
                await stream.send(b"wrap")
                assert await stream.receive() == b"WRAP"


@pytest.mark.anyio
async def test_listener_takes_anyios_positional_and_keyword_arguments(pki: Pki) -> None:
    ctx = pki.server_ctx()

    async def echo(stream: S.AsyncTLSStream) -> None:
        async with stream:
            await stream.send((await stream.receive()).upper())

    makers: tuple[Callable[[Listener[Any]], S.AsyncTLSListener], ...] = (
        lambda tcp: S.TLSListener(tcp, ctx, False, 5),
        lambda tcp: S.TLSListener(tcp, ssl_context=ctx, standard_compatible=False,
                                  handshake_timeout=5))
    for make in makers:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        listener = make(tcp)
        assert listener.ssl_context is ctx and listener.context is ctx
        assert listener.standard_compatible is False and listener.handshake_timeout == 5
        assert listener.extra(TLSAttribute.standard_compatible) is False
        port = tcp.extra(SocketAttribute.local_port)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, echo)
                # anyio's own client (stdlib ssl) against our listener
                client = await anyio.connect_tcp("127.0.0.1", port, ssl_context=stdlib_client_ctx(
                    pki), tls_hostname="localhost", tls_standard_compatible=False)
                async with client:
                    await client.send(b"listen")
                    assert await client.receive() == b"LISTEN"
                tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_our_connectable_is_taken_by_code_written_for_anyios(pki: Pki) -> None:
    """Code that takes anyio connectables (``anyio.as_connectable``, ``.connect()``)."""

    async def fetch(remote: Any) -> bytes:   # written against anyio's API only
        connectable = anyio.as_connectable(remote)
        async with await connectable.connect() as stream:
            await stream.send(b"conn")
            return await stream.receive()

    with anyio.fail_after(TIMEOUT):
        async with stock_echo_server(pki) as (port, _):
            tls = S.TLSConnectable(anyio.TCPConnectable("127.0.0.1", port),
                                   hostname="localhost", ssl_context=pki.client_ctx())
            assert isinstance(tls, anyio.abc.ByteStreamConnectable)
            assert await fetch(tls) == b"CONN"
            ours = S.as_connectable(("127.0.0.1", port), tls=True,
                                    ssl_context=pki.client_ctx(), tls_hostname="localhost")
            assert await fetch(ours) == b"CONN"
            # the host of the pair is the default host name: 127.0.0.1 is in the cert
            assert await fetch(S.as_connectable(("127.0.0.1", port),
                                                ssl_context=pki.client_ctx())) == b"CONN"
            plain = S.as_connectable(("127.0.0.1", port))
            assert isinstance(plain, anyio.TCPConnectable)


@pytest.mark.anyio
async def test_connectable_failure_closes_the_transport_and_raises_tls_error(pki: Pki) -> None:
    with anyio.fail_after(TIMEOUT):
        async with stock_echo_server(pki) as (port, _):
            bad = S.TLSConnectable(anyio.TCPConnectable("127.0.0.1", port),
                                   hostname="wrong.test", ssl_context=pki.client_ctx())
            with pytest.raises(A.CertificateVerifyError):
                await bad.connect()


# -- trio's names, against trio.SSLStream on the stdlib -----------------------------------
def test_trio_names_with_trios_keywords(pki: Pki) -> None:
    ctx = pki.client_ctx()
    server_ctx = pki.server_ctx()

    async def stock_echo(stream: trio.SSLStream[Any]) -> None:
        async with stream:
            await stream.send_all((await stream.receive_some()).upper())

    async def our_echo(stream: T.SSLStream[Any]) -> None:
        async with stream:
            await stream.send_all((await stream.receive_some()).upper())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stock = await nursery.start(trio.serve_ssl_over_tcp, stock_echo, 0,
                                        stdlib_server_ctx(pki))
            port = stock[0].transport_listener.socket.getsockname()[1]
            # our client with trio's names and keywords
            client = await T.open_ssl_over_tcp_stream("localhost", port, ssl_context=ctx,
                                                      https_compatible=False,
                                                      happy_eyeballs_delay=0.1)
            assert isinstance(client, T.SSLStream) and isinstance(client, T.TrioTLSStream)
            await client.send_all(b"trio")
            assert await client.receive_some() == b"TRIO"
            await client.aclose()

            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            client = T.SSLStream(tcp, ssl_context=ctx, server_hostname="localhost",
                                 server_side=False, https_compatible=False)
            await client.send_all(b"stream")
            assert await client.receive_some() == b"STREAM"
            await client.aclose()

            # our servers with trio's names; trio's own client
            ours = await nursery.start(partial_serve, our_echo, server_ctx)
            our_port = ours[0].transport_listener.socket.getsockname()[1]
            listeners = await T.open_ssl_over_tcp_listeners(0, server_ctx, host="127.0.0.1",
                                                            https_compatible=True, backlog=5)
            assert all(isinstance(x, T.SSLListener) for x in listeners)
            nursery.start_soon(trio.serve_listeners, our_echo, listeners)
            # transport_listener is typed a plain Listener; over TCP it is a trio.SocketListener
            tcp_listener = cast(trio.SocketListener, listeners[0].transport_listener)
            for p in (our_port, tcp_listener.socket.getsockname()[1]):
                stock_client = await trio.open_ssl_over_tcp_stream(
                    "localhost", p, ssl_context=stdlib_client_ctx(pki))
                await stock_client.send_all(b"stock")
                assert await stock_client.receive_some() == b"STOCK"
                await stock_client.aclose()
            nursery.cancel_scope.cancel()

    async def partial_serve(handler: Any, context: A.TLSContext,
                            task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await T.serve_ssl_over_tcp(handler, 0, ssl_context=context, host="127.0.0.1",
                                   task_status=task_status)

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded)


def test_trio_positional_context_still_works_with_trios_order(pki: Pki) -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        client = T.SSLStream(a, pki.client_ctx(), server_hostname="localhost")
        server = T.SSLStream(b, pki.server_ctx(), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert client.version() == server.version() == "TLSv1.3"

    trio.run(main)


# -- the stdlib's names: ``from anyio_asyncssl import ssl`` --------------------------------
def test_ssl_module_makes_tls_contexts_and_keeps_every_other_stdlib_name() -> None:
    from anyio_asyncssl import ssl as ours

    assert ours.SSLContext is A.TLSContext
    ctx = ours.create_default_context(ours.Purpose.CLIENT_AUTH)
    assert isinstance(ctx, A.TLSContext) and ctx.protocol == ssl.PROTOCOL_TLS_SERVER
    client = ours.SSLContext(ours.PROTOCOL_TLS_CLIENT)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    for name in ("SSLError", "Purpose", "CERT_REQUIRED", "TLSVersion", "OP_NO_COMPRESSION",
                 "HAS_SNI", "OPENSSL_VERSION", "SSLZeroReturnError", "DER_cert_to_PEM_cert"):
        assert getattr(ours, name) is getattr(ssl, name), name
    assert issubclass(A.TLSError, ours.SSLError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ours.nope  # noqa: B018


def test_trustme_helpers_configure_tls_contexts(pki: Pki) -> None:
    server = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    leaf = pki.ca.issue_cert("helper.test")
    configure_cert(leaf, server)
    client = A.TLSContext(ssl.PROTOCOL_TLS_CLIENT)
    configure_trust(pki.ca, client)

    async def main() -> None:
        with anyio.fail_after(TIMEOUT):
            tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = tcp.extra(SocketAttribute.local_port)

            async def echo(stream: S.AsyncTLSStream) -> None:
                async with stream:
                    await stream.send(await stream.receive())

            async with anyio.create_task_group() as tg:
                tg.start_soon(S.TLSListener(tcp, server).serve, echo)
                async with await S.connect_tcp("127.0.0.1", port, ssl_context=client,
                                               tls_hostname="helper.test") as stream:
                    await stream.send(b"x")
                    assert await stream.receive() == b"x"
                tg.cancel_scope.cancel()

    anyio.run(main)
