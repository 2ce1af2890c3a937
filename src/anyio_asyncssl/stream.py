"""The anyio face: AsyncTLSStream, AsyncTLSListener, connect_tcp, TLSConnectable.

A drop-in for :mod:`anyio.streams.tls` under anyio's own names and keywords
(``TLSStream``, ``TLSListener``, ``TLSConnectable``, ``as_connectable``,
``connect_tcp(..., tls=True, ssl_context=, tls_hostname=, ...)``), so moving
over is an import change: ``AsyncTLSStream.wrap()`` mirrors
``TLSStream.wrap()``, the stream answers anyio's own ``TLSAttribute`` keys, and
errors use anyio's vocabulary (``BrokenResourceError``, ``EndOfStream``,
``BusyResourceError``, ``ClosedResourceError``); handshake failures raise
:class:`~anyio_asyncssl.TLSError` subclasses, which are ``ssl.SSLError``\\ s,
as anyio's TLSStream raises ``ssl.SSLError``.  Contexts are
:class:`~anyio_asyncssl.TLSContext` objects: a stdlib ``ssl.SSLContext`` is a
``TypeError`` at once (:func:`~anyio_asyncssl.context.require_tls_context`).
The work is done by :class:`~anyio_asyncssl.driver.Driver`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import wraps
from ipaddress import IPv4Address, IPv6Address
from os import PathLike
from typing import Any

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
    aclose_forcefully,
    get_cancelled_exc_class,
)
from anyio.abc import (
    AnyByteStream,
    AnyByteStreamConnectable,
    ByteStream,
    ByteStreamConnectable,
    Listener,
    TaskGroup,
)
from anyio.streams.tls import TLSAttribute

from .connection import TLSConnection, TLSSession
from .context import TLSContext, check_hostname_text, create_default_context, pick_context
from .driver import Driver, StreamBroken, StreamClosed
from .errors import TLSEOFError
from .offload import Offload
from .sockets import SocketIO, take_over

__all__ = [
    "AsyncTLSAttribute",
    "AsyncTLSListener",
    "AsyncTLSStream",
    "TLSAttribute",
    "TLSConnectable",
    "TLSListener",
    "TLSStream",
    "as_connectable",
    "connect_tcp",
]

# anyio words it "Another task is already <action> this resource"
_ACTIONS = {"sending": "writing to", "receiving": "reading from"}


class AsyncTLSAttribute(anyio.TypedAttributeSet):
    """Attributes beyond anyio's :class:`~anyio.streams.tls.TLSAttribute`."""

    #: ``SSL_get_async_status`` after the last pause (an AsyncStatus)
    async_status: Any = anyio.typed_attribute()
    #: how many times an operation of this stream paused for the engine
    pauses: int = anyio.typed_attribute()
    #: whether the session was resumed (a ticket or session id)
    session_reused: bool = anyio.typed_attribute()
    #: the session, to pass as ``session=`` to a later connection
    session: TLSSession | None = anyio.typed_attribute()
    #: per-connection counters of the async machinery
    async_stats: dict[str, int] = anyio.typed_attribute()
    #: the context's Offload (None without offload)
    offload: Offload | None = anyio.typed_attribute()


@dataclass(eq=False)
class AsyncTLSStream(ByteStream):
    """A TLS byte stream over ``transport_stream``, driven by OpenSSL's async mode.

    No public initializer; use :meth:`wrap`.  All :class:`TLSAttribute` and
    :class:`AsyncTLSAttribute` extra attributes are supported.
    """

    transport_stream: AnyByteStream
    standard_compatible: bool
    _conn: TLSConnection
    _sock: SocketIO | None = None
    _driver: Driver = field(init=False)

    def __post_init__(self) -> None:
        transport = self.transport_stream

        async def receive() -> bytes:
            try:
                return await transport.receive()
            except EndOfStream:
                return b""

        self._driver = Driver(self._conn, transport.send, receive, sock=self._sock,
                              busy_error=_busy_error)

    @classmethod
    async def wrap(
        cls,
        transport_stream: AnyByteStream,
        *,
        server_side: bool | None = None,
        hostname: str | None = None,
        ssl_context: TLSContext | None = None,
        standard_compatible: bool = True,
        context: TLSContext | None = None,
        session: TLSSession | None = None,
        native_socket: bool = True,
    ) -> AsyncTLSStream:
        """Wrap ``transport_stream`` and do the TLS handshake, like ``TLSStream.wrap()``.

        anyio's keywords, with the same meaning: ``server_side`` defaults to
        ``not hostname``; ``hostname`` is checked against the certificate and
        sent as SNI (IDNA 2008); ``ssl_context`` (or its alias ``context``) is
        a :class:`~anyio_asyncssl.TLSContext`, and without one a secure
        default is made.  Ours: ``session`` resumes an earlier session
        (clients); with ``native_socket`` (default) and one of anyio's socket
        streams, OpenSSL reads and writes the socket itself and no ciphertext
        passes through Python.  Other streams (memory streams, TLS in TLS,
        your own) go through memory BIOs.

        Raises ``TypeError`` at once for a context that is not a
        ``TLSContext`` (a stdlib ``ssl.SSLContext``: the message says how to
        build the equivalent), :class:`~anyio_asyncssl.TLSError` (an
        ``ssl.SSLError``) if the handshake fails and ``BrokenResourceError``
        if the transport does.
        """
        ctx = pick_context(context, ssl_context, "context")
        if server_side is None:
            server_side = not hostname
        if ctx is None:
            purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
            ctx = create_default_context(purpose)
        conn = TLSConnection(ctx, server_side=server_side,
                             server_hostname=None if server_side else hostname,
                             session=session)
        sock = take_over(transport_stream) if native_socket else None
        stream = cls(transport_stream=transport_stream, standard_compatible=standard_compatible,
                     _conn=conn, _sock=sock)
        try:
            await stream._call(stream._driver.handshake)
        except BaseException:
            stream._driver.release_socket()
            raise
        return stream

    # -- the one error mapping ----------------------------------------------------
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a driver operation; its outcomes in anyio's vocabulary."""
        d = self._driver
        try:
            d.check()
            mark = d.io_events
            result = await fn(*args)
            if mark == d.io_events:
                # it never waited (the native path, data already there): let
                # other tasks run, as every anyio stream operation does
                try:
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                except BaseException:
                    # asyncio's native cancel passes the shield: the operation
                    # is done, and what a read returned is the next read's
                    if fn == d.read and result:
                        d.unread(result)
                    raise
            return result
        except StreamClosed as exc:
            raise ClosedResourceError(str(exc)) from None
        except StreamBroken as exc:
            raise BrokenResourceError(f"the TLS stream is broken ({exc})") from None
        except TLSEOFError as exc:
            if self.standard_compatible:
                raise BrokenResourceError from exc
            raise EndOfStream from None
        except ssl.SSLError:
            raise   # TLSError: anyio's TLSStream raises ssl.SSLError too
        except (OSError, BrokenResourceError, ClosedResourceError) as exc:
            raise BrokenResourceError from exc

    # -- ByteStream ---------------------------------------------------------------
    async def receive(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        with self._driver.receiving:
            data: bytes = await self._call(self._driver.read, max_bytes)
        if not data:
            raise EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        with self._driver.sending:
            await self._call(self._driver.write, item)

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving until the peer's close_notify.

        TLS 1.3 makes this a real half-close: the peer may go on sending.  TLS
        1.2 (RFC 5246 7.2.1) expects the peer to answer with its own
        close_notify at once, but OpenSSL still reads whatever the peer sends
        before it, so :meth:`receive` works on either version until then.
        """
        with self._driver.sending:
            await self._call(self._driver.send_eof)

    async def unwrap(self) -> tuple[AnyByteStream, bytes]:
        """Do the TLS closing handshake; return the transport and bytes read past it."""
        trailing: bytes = await self._call(self._driver.unwrap)
        return self.transport_stream, trailing

    async def aclose(self) -> None:
        d = self._driver
        if d.closed:
            return
        try:
            # (asyncio's native cancel passes drain_pause's shield: the
            # transport is closed on that way out too)
            await d.drain_pause()
            if self.standard_compatible and d.broken is None:
                await self.unwrap()
        except BaseException:
            await aclose_forcefully(self.transport_stream)
            raise
        finally:
            # the SSL object is freed with the stream (attributes stay readable)
            d.closed = True
            d.release_socket()
        await self.transport_stream.aclose()

    # -- attributes -----------------------------------------------------------------
    @property
    def ssl_object(self) -> TLSConnection:
        return self._conn

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        conn = self._conn
        return {
            **self.transport_stream.extra_attributes,
            TLSAttribute.alpn_protocol: conn.selected_alpn_protocol,
            TLSAttribute.channel_binding_tls_unique: conn.get_channel_binding,
            TLSAttribute.cipher: conn.cipher,
            TLSAttribute.peer_certificate: lambda: conn.getpeercert(False),
            TLSAttribute.peer_certificate_binary: lambda: conn.getpeercert(True),
            TLSAttribute.server_side: lambda: conn.server_side,
            TLSAttribute.shared_ciphers: lambda: (
                conn.shared_ciphers() if conn.server_side else None),
            TLSAttribute.standard_compatible: lambda: self.standard_compatible,
            TLSAttribute.ssl_object: lambda: conn,
            TLSAttribute.tls_version: conn.version,
            AsyncTLSAttribute.async_status: lambda: conn.async_status,
            AsyncTLSAttribute.pauses: lambda: self._driver.pauses,
            AsyncTLSAttribute.session_reused: lambda: conn.session_reused,
            AsyncTLSAttribute.session: lambda: conn.session,
            AsyncTLSAttribute.async_stats: conn.stats,
            AsyncTLSAttribute.offload: lambda: conn.context.offload,
        }


@dataclass(eq=False, init=False)
class AsyncTLSListener(Listener[AsyncTLSStream]):
    """Wraps a listener; every accepted connection gets a TLS handshake.

    Mirrors :class:`anyio.streams.tls.TLSListener`, positional arguments and
    keywords included (``ssl_context`` is accepted as well as ``context``; the
    attribute answers to both names).  A handshake that fails or exceeds
    ``handshake_timeout`` goes to :meth:`handle_handshake_error`.  Raises
    ``TypeError`` at once for a context that is not a ``TLSContext``.
    """

    listener: Listener[Any]
    context: TLSContext
    standard_compatible: bool = True
    handshake_timeout: float = 30

    def __init__(
        self,
        listener: Listener[Any],
        context: TLSContext | None = None,
        standard_compatible: bool = True,
        handshake_timeout: float = 30,
        *,
        ssl_context: TLSContext | None = None,
    ) -> None:
        ctx = pick_context(context, ssl_context, "context")
        if ctx is None:
            raise TypeError("AsyncTLSListener needs a TLSContext (context= or ssl_context=)")
        self.listener = listener
        self.context = ctx
        self.standard_compatible = standard_compatible
        self.handshake_timeout = handshake_timeout

    @property
    def ssl_context(self) -> TLSContext:
        """The context, under anyio's name for it."""
        return self.context

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: AnyByteStream) -> None:
        """Close the stream; log the error unless it is a cancellation; re-raise base ones.

        ``stream`` (the transport) is still open when this is called, so an
        override can read its attributes (the peer's address); the listener
        closes it afterwards whatever the override does.
        """
        await aclose_forcefully(stream)
        if not isinstance(exc, get_cancelled_exc_class()):
            logging.getLogger(__name__).exception("Error during TLS handshake", exc_info=exc)
        if not isinstance(exc, Exception) or isinstance(exc, get_cancelled_exc_class()):
            raise exc

    async def serve(
        self,
        handler: Callable[[AsyncTLSStream], Any],
        task_group: TaskGroup | None = None,
    ) -> None:
        @wraps(handler)
        async def handler_wrapper(stream: AnyByteStream) -> None:
            try:
                with anyio.fail_after(self.handshake_timeout):
                    wrapped = await AsyncTLSStream.wrap(
                        stream, context=self.context, server_side=True,
                        standard_compatible=self.standard_compatible)
            except BaseException as exc:
                try:
                    await self.handle_handshake_error(exc, stream)
                finally:
                    await aclose_forcefully(stream)
            else:
                await handler(wrapped)

        await self.listener.serve(handler_wrapper, task_group)

    async def aclose(self) -> None:
        await self.listener.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {TLSAttribute.standard_compatible: lambda: self.standard_compatible}


async def connect_tcp(
    remote_host: str | IPv4Address | IPv6Address,
    remote_port: int,
    *,
    local_host: str | IPv4Address | IPv6Address | None = None,
    local_port: int | None = None,
    tls: bool = True,
    ssl_context: TLSContext | None = None,
    tls_standard_compatible: bool = True,
    tls_hostname: str | None = None,
    happy_eyeballs_delay: float = 0.25,
    context: TLSContext | None = None,
    hostname: str | None = None,
    standard_compatible: bool | None = None,
    session: TLSSession | None = None,
) -> AsyncTLSStream:
    """Connect over TCP and wrap with TLS: ``anyio.connect_tcp(..., tls=True)``.

    anyio's keywords, with the same meaning (``tls_hostname``, default
    ``remote_host``, is verified and sent as SNI), and shorter aliases
    (``context``, ``hostname``, ``standard_compatible``); ``session`` resumes
    an earlier session.  ``tls=False`` is refused: for plain TCP call
    :func:`anyio.connect_tcp`.

    Raises ``TypeError`` (before any I/O) for a context that is not a
    ``TLSContext`` or for both spellings of one keyword,
    :class:`~anyio_asyncssl.TLSError` if the handshake fails and ``OSError``
    if the connection does.
    """
    if not tls:
        raise TypeError("anyio_asyncssl.stream.connect_tcp always does TLS; "
                        "use anyio.connect_tcp() for plain TCP")
    ctx = pick_context(context, ssl_context, "context")
    if hostname is not None and tls_hostname is not None:
        raise TypeError("give hostname= or tls_hostname=, not both")
    if standard_compatible is None:
        standard_compatible = tls_standard_compatible
    elif tls_standard_compatible is not True:
        raise TypeError("give standard_compatible= or tls_standard_compatible=, not both")
    server_name = hostname or tls_hostname or str(remote_host)
    check_hostname_text(server_name)   # before any I/O
    stream = await anyio.connect_tcp(remote_host, remote_port, local_host=local_host,
                                     local_port=local_port,
                                     happy_eyeballs_delay=happy_eyeballs_delay)
    try:
        return await AsyncTLSStream.wrap(
            stream, context=ctx, server_side=False, hostname=server_name,
            standard_compatible=standard_compatible, session=session)
    except BaseException:
        await aclose_forcefully(stream)
        raise


class TLSConnectable(ByteStreamConnectable):
    """anyio's :class:`~anyio.streams.tls.TLSConnectable` on our streams.

    Wraps another connectable (``anyio.TCPConnectable``, ...) and does the TLS
    handshake after it connects; code written against anyio's connectables
    takes it as it is.  ``ssl_context`` (or ``context``) is a ``TLSContext``
    (default: a secure client context); ``hostname`` is checked and sent as
    SNI.  Raises ``TypeError`` at once for any other context type.
    """

    def __init__(
        self,
        connectable: AnyByteStreamConnectable,
        *,
        hostname: str | None = None,
        ssl_context: TLSContext | None = None,
        standard_compatible: bool = True,
        context: TLSContext | None = None,
        session: TLSSession | None = None,
    ) -> None:
        self.connectable = connectable
        self.ssl_context: TLSContext = (pick_context(context, ssl_context, "context")
                                        or create_default_context(ssl.Purpose.SERVER_AUTH))
        if hostname is not None:
            check_hostname_text(hostname)
        self.hostname = hostname
        self.standard_compatible = standard_compatible
        self.session = session

    async def connect(self) -> AsyncTLSStream:
        """Connect the wrapped connectable, then do the TLS handshake."""
        stream = await self.connectable.connect()
        try:
            return await AsyncTLSStream.wrap(
                stream, hostname=self.hostname, context=self.ssl_context, server_side=False,
                standard_compatible=self.standard_compatible, session=self.session)
        except BaseException:
            await aclose_forcefully(stream)
            raise


def as_connectable(
    remote: ByteStreamConnectable | tuple[str | IPv4Address | IPv6Address, int] | str
    | bytes | PathLike[str],
    /,
    *,
    tls: bool = False,
    ssl_context: TLSContext | None = None,
    tls_hostname: str | None = None,
    tls_standard_compatible: bool = True,
) -> ByteStreamConnectable:
    """:func:`anyio.as_connectable`, wrapping in our :class:`TLSConnectable` when ``tls``.

    ``ssl_context`` given implies ``tls``.  The host of a ``(host, port)``
    pair is the default ``tls_hostname``, as in anyio.
    """
    tls = tls or ssl_context is not None
    plain = anyio.as_connectable(remote)
    if not tls:
        return plain
    if not tls_hostname and isinstance(plain, anyio.TCPConnectable):
        tls_hostname = str(plain.host)
    return TLSConnectable(plain, ssl_context=ssl_context, hostname=tls_hostname,
                          standard_compatible=tls_standard_compatible)


# anyio's names, so moving over is an import change
TLSStream = AsyncTLSStream
TLSListener = AsyncTLSListener


def _busy_error(what: str) -> Exception:
    return BusyResourceError(_ACTIONS[what])
