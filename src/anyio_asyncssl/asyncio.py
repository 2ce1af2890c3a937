"""asyncio's own TLS API on our transports: create_server, create_connection, start_tls.

Two ways in:

* the functions here (:func:`create_server`, :func:`create_connection`,
  :func:`start_tls`, :func:`start_server`, :func:`open_connection`) take a
  :class:`~anyio_asyncssl.TLSContext` as ``ssl=`` and work on any running
  asyncio loop (uvloop included): they make a plain connection or server
  with the loop and stack :class:`~anyio_asyncssl.asyncio_tls.TLSProtocol`
  on each connection, as asyncio stacks its ``SSLProtocol``;
* a loop whose own methods do that: :func:`new_event_loop` (or
  :class:`EventLoopPolicy`, or ``asyncio.Runner(loop_factory=new_event_loop)``)
  gives a loop whose ``create_server``, ``create_connection``,
  ``create_unix_server``, ``create_unix_connection`` and ``start_tls`` accept
  a ``TLSContext`` as ``ssl=``, so servers that call those methods (uvicorn,
  aiohttp, hypercorn's asyncio worker, ``asyncio.start_server``,
  ``StreamWriter.start_tls``) get our TLS without knowing it.  Given a stdlib
  ``ssl.SSLContext`` (or ``ssl=True``) the loop behaves exactly as asyncio
  does: it calls asyncio's own code.  ``new_event_loop(uvloop=True)`` builds
  the same on uvloop.  uvicorn takes the loop as an import string:
  ``loop="anyio_asyncssl.asyncio:new_event_loop"`` (or
  ``:new_uvloop_event_loop``).

Keywords and errors are asyncio's: ``server_hostname`` (default: ``host``;
``""`` disables SNI and the host-name check), ``ssl_handshake_timeout``,
``ssl_shutdown_timeout``; a failed handshake raises our
:class:`~anyio_asyncssl.TLSError` (an ``ssl.SSLError``) from
``create_connection``/``start_tls``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .asyncio_tls import TLSProtocol, TLSTransport
from .context import TLSContext, require_tls_context

__all__ = [
    "EventLoopPolicy",
    "TLSEventLoop",
    "create_connection",
    "create_server",
    "create_unix_connection",
    "create_unix_server",
    "is_tls_loop",
    "new_event_loop",
    "new_uvloop_event_loop",
    "open_connection",
    "start_server",
    "start_tls",
]

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
_STREAM_LIMIT = 2 ** 16   # asyncio.streams' default


def _client_hostname(ssl: TLSContext, host: str | None, server_hostname: str | None) -> str | None:
    """asyncio's rule: default ``host``; ``""`` means none; required when names are checked."""
    if server_hostname is None:
        server_hostname = host
    if not server_hostname:
        if ssl.check_hostname:
            raise ValueError("You must set server_hostname when using ssl without a host")
        return None
    return server_hostname


async def _connect(
    make_raw: Callable[[ProtocolFactory], Awaitable[tuple[asyncio.BaseTransport, Any]]],
    protocol_factory: ProtocolFactory,
    ssl: TLSContext,
    server_hostname: str | None,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    app_protocol = protocol_factory()
    tls = TLSProtocol(loop, app_protocol, ssl, waiter, server_side=False,
                      server_hostname=server_hostname,
                      ssl_handshake_timeout=ssl_handshake_timeout,
                      ssl_shutdown_timeout=ssl_shutdown_timeout)
    # ours to return: the protocol lets go of it once the connection is lost
    transport = tls.app_transport
    assert transport is not None
    try:
        raw, _ = await make_raw(lambda: tls)
        try:
            await waiter
        except BaseException:
            raw.abort()  # type: ignore[attr-defined]
            raise
    except BaseException:
        # cancelled while connecting: the handshake may still have started and
        # would fail into a waiter nobody awaits ("exception never retrieved")
        waiter.cancel()
        raise
    return transport, app_protocol


async def create_connection(
    protocol_factory: ProtocolFactory,
    host: str | None = None,
    port: int | None = None,
    *,
    ssl: TLSContext,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    **kwargs: Any,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """``loop.create_connection(..., ssl=context)`` with our TLS, on the running loop.

    Returns once the handshake is done, like asyncio.  ``kwargs`` are the
    loop's (``sock``, ``local_addr``, ``happy_eyeballs_delay``, ...).  Raises
    ``TypeError`` for a context that is not a ``TLSContext``, ``ValueError``
    without a host name when the context checks names,
    :class:`~anyio_asyncssl.TLSError` if the handshake fails,
    ``ConnectionAbortedError`` if it takes longer than
    ``ssl_handshake_timeout``, ``OSError`` if the connection fails.
    """
    ssl = require_tls_context(ssl, "ssl")
    hostname = _client_hostname(ssl, host, server_hostname)
    loop = asyncio.get_running_loop()
    return await _connect(
        lambda factory: loop.create_connection(factory, host, port, **kwargs),  # type: ignore[arg-type]
        protocol_factory, ssl, hostname, ssl_handshake_timeout, ssl_shutdown_timeout)


async def create_unix_connection(
    protocol_factory: ProtocolFactory,
    path: str | None = None,
    *,
    ssl: TLSContext,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    **kwargs: Any,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """``loop.create_unix_connection(..., ssl=context)`` with our TLS.

    Errors as :func:`create_connection`.
    """
    ssl = require_tls_context(ssl, "ssl")
    hostname = _client_hostname(ssl, None, server_hostname)
    loop = asyncio.get_running_loop()
    return await _connect(
        lambda factory: loop.create_unix_connection(factory, path, **kwargs),
        protocol_factory, ssl, hostname, ssl_handshake_timeout, ssl_shutdown_timeout)


def _server_factory(protocol_factory: ProtocolFactory, ssl: TLSContext,
                    ssl_handshake_timeout: float | None,
                    ssl_shutdown_timeout: float | None) -> ProtocolFactory:
    ssl = require_tls_context(ssl, "ssl")
    for name, value in (("ssl_handshake_timeout", ssl_handshake_timeout),
                        ("ssl_shutdown_timeout", ssl_shutdown_timeout)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} should be a positive number, got {value}")

    def factory() -> TLSProtocol:
        return TLSProtocol(asyncio.get_running_loop(), protocol_factory(), ssl, None,
                           server_side=True, ssl_handshake_timeout=ssl_handshake_timeout,
                           ssl_shutdown_timeout=ssl_shutdown_timeout)

    return factory


async def create_server(
    protocol_factory: ProtocolFactory,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    ssl: TLSContext,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``loop.create_server(..., ssl=context)`` with our TLS, on the running loop.

    Every accepted connection does its handshake in its own task; the
    application protocol's ``connection_made`` comes after it.  A failed
    handshake closes that connection (as asyncio, it is not reported unless
    it is not an ``OSError``).  Raises ``TypeError`` for a context that is
    not a ``TLSContext``, ``ValueError`` for a non-positive timeout,
    ``OSError`` if the address cannot be bound.
    """
    factory = _server_factory(protocol_factory, ssl, ssl_handshake_timeout,
                              ssl_shutdown_timeout)
    return await asyncio.get_running_loop().create_server(factory, host, port, **kwargs)


async def create_unix_server(
    protocol_factory: ProtocolFactory,
    path: str | None = None,
    *,
    ssl: TLSContext,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``loop.create_unix_server(..., ssl=context)`` with our TLS.

    Errors as :func:`create_server`.
    """
    factory = _server_factory(protocol_factory, ssl, ssl_handshake_timeout,
                              ssl_shutdown_timeout)
    return await asyncio.get_running_loop().create_unix_server(factory, path, **kwargs)


async def start_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    sslcontext: TLSContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
) -> TLSTransport:
    """``loop.start_tls()``: upgrade an existing connection to TLS; returns the new transport.

    As asyncio's: ``transport`` must support it (a socket transport, or one
    of our TLS transports: TLS in TLS), its reading is paused while the
    protocol is swapped, and the old transport must not be used afterwards.
    Raises ``TypeError`` for an unsupported transport or a context that is
    not a ``TLSContext``, :class:`~anyio_asyncssl.TLSError` if the handshake
    fails (the transport is then closed).
    """
    sslcontext = require_tls_context(sslcontext, "sslcontext")
    if not getattr(transport, "_start_tls_compatible", False):
        raise TypeError(f"transport {transport!r} is not supported by start_tls()")
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    tls = TLSProtocol(loop, protocol, sslcontext, waiter, server_side=server_side,
                      server_hostname=None if server_side else server_hostname,
                      call_connection_made=False,
                      ssl_handshake_timeout=ssl_handshake_timeout,
                      ssl_shutdown_timeout=ssl_shutdown_timeout)
    tls_transport = tls.app_transport     # the protocol lets go of it once lost
    assert tls_transport is not None
    transport.pause_reading()  # type: ignore[attr-defined]
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)  # type: ignore[attr-defined]
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return tls_transport


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    ssl: TLSContext,
    limit: int = _STREAM_LIMIT,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_connection` with our TLS: a (reader, writer) pair.

    Errors as :func:`create_connection`.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, ssl=ssl, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    ssl: TLSContext,
    limit: int = _STREAM_LIMIT,
    **kwargs: Any,
) -> asyncio.Server:
    """:func:`asyncio.start_server` with our TLS.

    ``client_connected_cb(reader, writer)`` runs per connection, after its
    handshake.  Errors as :func:`create_server`.
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, ssl=ssl, **kwargs)


# -- the loop ---------------------------------------------------------------------------
class _TLSLoopMethods:
    """Loop methods that route ``ssl=TLSContext`` to our layer and anything else to asyncio's."""

    async def create_connection(self, protocol_factory: ProtocolFactory, host: Any = None,
                                port: Any = None, *, ssl: Any = None,
                                **kwargs: Any) -> Any:
        if isinstance(ssl, TLSContext):
            return await create_connection(protocol_factory, host, port, ssl=ssl, **kwargs)
        return await super().create_connection(  # type: ignore[misc]
            protocol_factory, host, port, ssl=ssl, **kwargs)

    async def create_server(self, protocol_factory: ProtocolFactory, host: Any = None,
                            port: Any = None, *, ssl: Any = None, **kwargs: Any) -> Any:
        if isinstance(ssl, TLSContext):
            return await create_server(protocol_factory, host, port, ssl=ssl, **kwargs)
        return await super().create_server(  # type: ignore[misc]
            protocol_factory, host, port, ssl=ssl, **kwargs)

    async def create_unix_connection(self, protocol_factory: ProtocolFactory,
                                     path: Any = None, *, ssl: Any = None,
                                     **kwargs: Any) -> Any:
        if isinstance(ssl, TLSContext):
            return await create_unix_connection(protocol_factory, path, ssl=ssl, **kwargs)
        return await super().create_unix_connection(  # type: ignore[misc]
            protocol_factory, path, ssl=ssl, **kwargs)

    async def create_unix_server(self, protocol_factory: ProtocolFactory, path: Any = None,
                                 *, ssl: Any = None, **kwargs: Any) -> Any:
        if isinstance(ssl, TLSContext):
            return await create_unix_server(protocol_factory, path, ssl=ssl, **kwargs)
        return await super().create_unix_server(  # type: ignore[misc]
            protocol_factory, path, ssl=ssl, **kwargs)

    async def start_tls(self, transport: Any, protocol: Any, sslcontext: Any,
                        **kwargs: Any) -> Any:
        if isinstance(sslcontext, TLSContext):
            return await start_tls(transport, protocol, sslcontext, **kwargs)
        return await super().start_tls(  # type: ignore[misc]
            transport, protocol, sslcontext, **kwargs)


def is_tls_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop``'s own methods take a ``TLSContext`` as ``ssl=`` (one of ours)."""
    return isinstance(loop, _TLSLoopMethods)


class TLSEventLoop(_TLSLoopMethods, asyncio.SelectorEventLoop):
    """asyncio's selector loop whose TLS methods also take a ``TLSContext``."""


def new_event_loop(*, uvloop: bool = False) -> asyncio.AbstractEventLoop:
    """A new loop whose ``create_server``/``create_connection``/``start_tls`` take a ``TLSContext``.

    ``uvloop=True`` builds it on uvloop (``ImportError`` when uvloop is not
    installed).  Use it as ``asyncio.run(main(), loop_factory=new_event_loop)``
    (Python 3.12+), ``asyncio.Runner(loop_factory=new_event_loop)``, or with
    :class:`EventLoopPolicy`.
    """
    if uvloop:
        return _uvloop_class()()
    return TLSEventLoop()


def new_uvloop_event_loop() -> asyncio.AbstractEventLoop:
    """:func:`new_event_loop` on uvloop (an import string for ``loop=`` settings)."""
    return new_event_loop(uvloop=True)


_uvloop_loop: type[asyncio.AbstractEventLoop] | None = None


def _uvloop_class() -> type[asyncio.AbstractEventLoop]:
    global _uvloop_loop
    if _uvloop_loop is None:
        import uvloop

        class UVLoopTLSEventLoop(_TLSLoopMethods, uvloop.Loop):  # type: ignore[misc]
            """uvloop's loop whose TLS methods also take a ``TLSContext``."""

        _uvloop_loop = UVLoopTLSEventLoop
    return _uvloop_loop


def _policy_class() -> type[asyncio.AbstractEventLoopPolicy]:
    class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
        """A policy whose loops are :func:`new_event_loop` loops (``uvloop=True``: on uvloop).

        asyncio's policies are deprecated from Python 3.14 on (as asyncio does,
        looking this name up then warns); ``asyncio.run(main(),
        loop_factory=new_event_loop)`` is the spelling that stays.
        """

        def __init__(self, *, uvloop: bool = False) -> None:
            super().__init__()
            self._uvloop = uvloop

        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return new_event_loop(uvloop=self._uvloop)

    EventLoopPolicy.__qualname__ = "EventLoopPolicy"
    return EventLoopPolicy


if TYPE_CHECKING:
    class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
        def __init__(self, *, uvloop: bool = False) -> None: ...
else:
    _policy: type[asyncio.AbstractEventLoopPolicy] | None = None

    def __getattr__(name: str) -> object:
        # made on first use: defining it at import would touch
        # asyncio.DefaultEventLoopPolicy, deprecated on Python 3.14
        global _policy
        if name == "EventLoopPolicy":
            if _policy is None:
                _policy = _policy_class()
            return _policy
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

