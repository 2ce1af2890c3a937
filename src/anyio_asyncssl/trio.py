"""The trio face: TrioTLSStream, TrioTLSListener and the ``*_tls_over_tcp_*`` helpers.

A drop-in for :class:`trio.SSLStream` and friends, driven by OpenSSL's async
mode.  Behaviour follows trio's ``_ssl.py`` (read it: it is the reference):

* the handshake is lazy: the first ``send_all``/``receive_some`` (or an
  explicit :meth:`TrioTLSStream.do_handshake`) runs it, and concurrent callers
  wait for that one handshake;
* every TLS or transport failure is a :exc:`trio.BrokenResourceError` whose
  ``__cause__`` is the original error (an ``ssl.SSLError`` subclass from
  :mod:`anyio_asyncssl.errors`, or the transport's exception); afterwards the
  stream stays broken.  A handshake that fails or is cancelled breaks the
  stream too, as in trio;
* two tasks in ``send_all`` (or in ``receive_some``) at once is a
  :exc:`trio.BusyResourceError`; any use after :meth:`~TrioTLSStream.aclose`
  is a :exc:`trio.ClosedResourceError`, and so is the error of a task whose
  transport was closed under it by ``aclose``;
* ``https_compatible=True``: a transport EOF without close_notify is a normal
  EOF (``receive_some`` returns ``b""``), and ``aclose`` just closes the
  transport.  Otherwise a ragged EOF breaks the stream, and ``aclose`` sends
  close_notify once, without waiting for the peer's, ignoring a broken
  transport;
* the TLS connection's inspection methods are forwarded (``getpeercert``,
  ``cipher``, ``version``, ``selected_alpn_protocol``, ...); those that only
  make sense after the handshake raise :exc:`trio.NeedHandshakeError` before.

trio's names are here too (``SSLStream``, ``SSLListener``,
``open_ssl_over_tcp_stream``, ``open_ssl_over_tcp_listeners``,
``serve_ssl_over_tcp``, with the ``ssl_context`` keyword), so a trio program
moves over by changing ``trio.`` to ``anyio_asyncssl.trio.`` in those names.

Beyond trio: :meth:`TrioTLSStream.send_eof` is a half-close: send
close_notify and keep receiving until the peer's close_notify.

The TLS work is done by :class:`~anyio_asyncssl.driver.Driver`, the same
retry loop as the anyio face: it waits for the offload engine inside shielded
scopes, so a cancelled operation never leaves an OpenSSL job paused.  This
module imports trio; the rest of the package does not need it.
"""

from __future__ import annotations

import operator
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NoReturn, TypeVar

import anyio
import trio
from trio.abc import HalfCloseableStream, Listener, Stream

from .connection import AsyncStatus, TLSConnection, TLSSession
from .context import TLSContext, check_hostname_text, create_default_context, pick_context
from .driver import Driver, StreamBroken, StreamClosed
from .sockets import take_over

__all__ = [
    "SSLListener",
    "SSLStream",
    "TrioTLSListener",
    "TrioTLSStream",
    "open_ssl_over_tcp_listeners",
    "open_ssl_over_tcp_stream",
    "open_tls_over_tcp_listeners",
    "open_tls_over_tcp_stream",
    "serve_ssl_over_tcp",
    "serve_tls_over_tcp",
]

T_Stream = TypeVar("T_Stream", bound=Stream)
R = TypeVar("R")

#: ``receive_some()`` without ``max_bytes`` returns at most this much (one
#: TLS record holds at most 16 KiB anyway).
DEFAULT_RECEIVE_SIZE = 65536

# What a failing operation may raise that means "this stream is broken".
# ssl.SSLError (so every TLSError) is an OSError.
# The driver's own errors are anyio's (the native path raises
# anyio.ClosedResourceError when the socket was closed under an operation).
_BREAKING = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
             anyio.BrokenResourceError, anyio.ClosedResourceError)


class _TransportIO:
    """The driver's view of the transport: ``send(bytes)``, ``receive() -> bytes``.

    Transport calls are counted, so that an operation that did no transport
    I/O still executes a schedule point (trio's checkpoint rule).  It refers
    to the transport only, never to the stream.
    """

    __slots__ = ("count", "transport")

    def __init__(self, transport: Stream) -> None:
        self.transport = transport
        self.count = 0

    async def send(self, data: bytes) -> None:
        self.count += 1
        await self.transport.send_all(data)

    async def receive(self) -> bytes:
        self.count += 1
        data = await self.transport.receive_some()
        return data if isinstance(data, bytes) else bytes(data)


def _is_eof(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a transport EOF without close_notify (a ragged EOF)."""
    return isinstance(exc, ssl.SSLEOFError) or (
        "UNEXPECTED_EOF_WHILE_READING" in str(getattr(exc, "reason", None) or ""))


_BUSY = {
    "sending": "another task is currently sending data on this TrioTLSStream",
    "receiving": "another task is currently receiving data on this TrioTLSStream",
}


class TrioTLSStream(HalfCloseableStream, Generic[T_Stream]):
    """TLS over ``transport_stream`` (any :class:`trio.abc.Stream`), like :class:`trio.SSLStream`.

    ``context`` (trio's name ``ssl_context`` works too, positionally or as a
    keyword) is a :class:`~anyio_asyncssl.TLSContext`.  ``server_hostname``
    (clients) is sent as SNI and checked against the certificate; it is
    required when the context checks host names.  ``session`` resumes a
    session from an earlier connection (clients).  Nothing is sent until the
    first operation (lazy handshake).

    Raises ``TypeError`` at once for a context that is not a ``TLSContext``
    (a stdlib ``ssl.SSLContext``: the message says how to build the
    equivalent) and ``ValueError`` for inconsistent arguments, e.g. no
    ``server_hostname`` with host-name checks.

    Attributes:
      transport_stream: the wrapped stream (``None`` after :meth:`unwrap`).
    """

    def __init__(
        self,
        transport_stream: T_Stream,
        context: TLSContext | None = None,
        *,
        server_hostname: str | bytes | None = None,
        server_side: bool = False,
        https_compatible: bool = False,
        session: TLSSession | None = None,
        native_socket: bool = True,
        ssl_context: TLSContext | None = None,
    ) -> None:
        ctx = _required_context(context, ssl_context)
        if isinstance(server_hostname, bytes):
            server_hostname = server_hostname.decode("ascii")
        self._conn = TLSConnection(ctx, server_side=server_side,
                                   server_hostname=server_hostname, session=session)
        self.transport_stream: T_Stream = transport_stream
        self._https_compatible = https_compatible

        self._io = _TransportIO(transport_stream)
        # a trio.SocketStream: OpenSSL does the socket I/O itself
        sock = take_over(transport_stream) if native_socket else None
        # like trio.SSLStream, a server holds its TLS 1.3 tickets until it sends
        self._driver = Driver(self._conn, self._io.send, self._io.receive, sock=sock,
                              hold_session_tickets=True,
                              busy_error=_busy_error)

    # -- the one error mapping ------------------------------------------------------
    def _check(self) -> None:
        try:
            self._driver.check()
        except (StreamClosed, StreamBroken) as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: BaseException) -> Exception:
        """The trio exception for a failure (raise it ``from exc`` when it is a cause)."""
        if isinstance(exc, StreamClosed):
            return trio.ClosedResourceError("this TrioTLSStream was closed")
        if isinstance(exc, StreamBroken):
            return trio.BrokenResourceError(f"this TrioTLSStream is broken ({exc})")
        if isinstance(exc, (trio.ClosedResourceError, anyio.ClosedResourceError)) and (
                self._driver.closing or self._driver.closed):
            # our own aclose() closed the transport under this operation
            return trio.ClosedResourceError("this TrioTLSStream was closed")
        self._driver.mark_broken(exc)
        return trio.BrokenResourceError(str(exc) or type(exc).__name__)

    async def _drive(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Run one driver operation as a trio checkpoint, mapping its failures."""
        await trio.lowlevel.checkpoint_if_cancelled()
        mark = self._io_events()
        try:
            result = await fn(*args)
        except (StreamClosed, StreamBroken) as exc:
            raise self._translate(exc) from None
        except _BREAKING as exc:
            raise self._translate(exc) from exc
        if mark == self._io_events():
            # no transport I/O (which always yields): the operation may have
            # completed from buffered data, or after a pause whose engine had
            # already finished, without a schedule point
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _io_events(self) -> int:
        """Transport calls and waits so far (each one a schedule point)."""
        return self._io.count + self._driver.io_events

    async def _ensure_handshake(self) -> None:
        if not self._conn.handshake_done:
            await self._drive(self._driver.ensure_handshake)

    # -- trio.abc.HalfCloseableStream --------------------------------------------
    async def do_handshake(self) -> None:
        """Make sure the handshake has completed (running it if nobody has yet).

        You need not call it: the first send or receive does it.  If another
        task is running the handshake this waits for it.  Raises
        ``BrokenResourceError`` (``__cause__``: the ``ssl.SSLError``, e.g.
        :class:`~anyio_asyncssl.CertificateVerifyError`) if it fails, and
        ``ClosedResourceError`` after :meth:`aclose`.  Cancelling it breaks the
        stream, as in trio.
        """
        self._check()
        if self._conn.handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted data (at most ``max_bytes``), or ``b""`` at the end of the stream.

        The end is the peer's close_notify, or with ``https_compatible`` also a
        transport EOF without it.  Raises ``BusyResourceError`` if another task
        is receiving, ``BrokenResourceError`` if TLS or the transport fails,
        ``ClosedResourceError`` after :meth:`aclose`.  A cancelled receive
        loses no data.
        """
        with self._driver.receiving:
            self._check()
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            try:
                await self._ensure_handshake()
                return await self._drive(self._driver.read, max_bytes)
            except trio.BrokenResourceError as exc:
                # the stream is broken now either way; https only changes the answer
                if self._https_compatible and _is_eof(exc.__cause__):
                    await trio.lowlevel.checkpoint()
                    return b""
                raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it all.

        Raises ``BusyResourceError`` if another task is sending,
        ``BrokenResourceError`` on failure, ``ClosedResourceError`` after
        :meth:`aclose` or :meth:`send_eof`.  A cancelled ``send_all`` may have
        sent part of ``data``, so it breaks the stream (trio's rule).
        """
        with self._driver.sending:
            self._check()
            if self._driver.eof_sent:
                raise trio.ClosedResourceError("send_eof() was already called")
            await self._ensure_handshake()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            # a send cancelled before it starts leaves the stream usable
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._drive(self._driver.write, data)
            except trio.Cancelled:
                # how much of data went out is unknown: the byte stream is unusable
                self._driver.mark_broken(None)
                raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport is ready for more data (see trio.abc.SendStream)."""
        with self._driver.sending:
            self._check()
            try:
                await self._driver.wait_send_ready(
                    self.transport_stream.wait_send_all_might_not_block)
            except _BREAKING as exc:
                raise self._translate(exc) from exc

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving until the peer's close_notify.

        The peer's ``receive_some`` then returns ``b""``.  TLS 1.3 makes this a
        real half-close: the peer may go on sending.  TLS 1.2 (RFC 5246 7.2.1)
        expects the peer to answer with its own close_notify at once, but
        OpenSSL still reads whatever the peer sends before it, so ``receive_some``
        works on either version until the peer's close_notify arrives.
        Idempotent; ``send_all`` afterwards raises ``ClosedResourceError``.
        """
        with self._driver.sending:
            self._check()
            if self._driver.eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await self._ensure_handshake()
            await self._drive(self._driver.send_eof)

    async def unwrap(self) -> tuple[T_Stream, bytes]:
        """Do the TLS closing handshake and give back the transport.

        Returns ``(transport_stream, trailing_bytes)``: bytes the peer sent
        after its close_notify that were already read from the transport;
        treat them as the start of what the transport receives next.  The
        stream is closed afterwards (``transport_stream`` is ``None``).
        """
        with self._driver.receiving, self._driver.sending:
            self._check()
            await self._ensure_handshake()
            trailing = await self._drive(self._driver.unwrap)
            transport_stream = self.transport_stream
            self.transport_stream = None  # type: ignore[assignment]  # closed: nothing uses it
            return transport_stream, trailing

    async def aclose(self) -> None:
        """Close the TLS connection and the transport.

        Without ``https_compatible``: finish the handshake if needed, send
        close_notify (once; a broken transport is ignored, the peer's reply is
        not awaited), then close the transport.  With ``https_compatible``, or
        on a broken stream: just close the transport.  A failing handshake
        raises ``BrokenResourceError`` (after closing), as in trio.  A
        cancelled ``aclose`` still closes.
        """
        driver = self._driver
        if driver.closed:
            await trio.lowlevel.checkpoint()
            return
        driver.closing = True
        try:
            if driver.broken is None and not self._https_compatible:
                await self._ensure_handshake()
                try:
                    await self._drive(driver.send_close_notify)
                except (trio.BrokenResourceError, trio.BusyResourceError,
                        trio.ClosedResourceError):
                    pass  # the peer may be closing at the same time: that is fine
        except BaseException:
            await self._close_transport(forcefully=True)
            raise
        await self._close_transport(forcefully=False)

    async def _close_transport(self, *, forcefully: bool) -> None:
        self._driver.closed = True
        try:
            await self._driver.drain_pause()
        finally:
            self._driver.release_socket()
            if forcefully:
                await trio.aclose_forcefully(self.transport_stream)
            else:
                await self.transport_stream.aclose()

    # -- forwarded inspection (trio.SSLStream forwards these to its SSLObject) ---
    def _need_handshake(self, name: str) -> TLSConnection:
        if not self._conn.handshake_done:
            raise trio.NeedHandshakeError(f"call do_handshake() before calling {name!r}")
        return self._conn

    @property
    def ssl_object(self) -> TLSConnection:
        """The sans-IO :class:`~anyio_asyncssl.TLSConnection` (the ``SSLObject``)."""
        return self._conn

    @property
    def context(self) -> TLSContext:
        return self._conn.context

    @property
    def server_side(self) -> bool:
        return self._conn.server_side

    @property
    def server_hostname(self) -> str | None:
        return self._conn.server_hostname

    @property
    def https_compatible(self) -> bool:
        return self._https_compatible

    @property
    def session(self) -> TLSSession | None:
        """The session, to pass as ``session=`` to a later connection."""
        return self._conn.session

    @property
    def session_reused(self) -> bool:
        return self._need_handshake("session_reused").session_reused

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate: the stdlib's dict, or DER bytes (``binary_form``)."""
        return self._need_handshake("getpeercert").getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._need_handshake("cipher").cipher()

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        return self._need_handshake("shared_ciphers").shared_ciphers()

    def compression(self) -> str | None:
        """Always ``None``: TLS compression is disabled."""
        self._need_handshake("compression")
        return None

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        return self._need_handshake("get_channel_binding").get_channel_binding(cb_type)

    def selected_alpn_protocol(self) -> str | None:
        return self._need_handshake("selected_alpn_protocol").selected_alpn_protocol()

    def version(self) -> str | None:
        return self._need_handshake("version").version()

    # -- async-mode extras ----------------------------------------------------------
    @property
    def pauses(self) -> int:
        """How many times an operation of this stream paused for the offload engine."""
        return self._driver.pauses

    @property
    def async_status(self) -> AsyncStatus:
        """``SSL_get_async_status`` after the last pause."""
        return self._conn.async_status

    def async_stats(self) -> dict[str, int]:
        """Per-connection counters of the async machinery."""
        return self._conn.stats()

    def __repr__(self) -> str:
        d = self._driver
        state = "closed" if d.closed else "broken" if d.broken is not None else "ok"
        return f"<TrioTLSStream {state} {self._conn!r}>"


class TrioTLSListener(Listener[TrioTLSStream[T_Stream]]):
    """Wraps every connection of ``transport_listener`` in a :class:`TrioTLSStream`.

    Like :class:`trio.SSLListener`: ``accept()`` does not handshake (the
    stream does it lazily), so one slow client never blocks the accept loop.
    Works with :func:`trio.serve_listeners`.  ``ssl_context`` is accepted
    as well as ``context``; ``TypeError`` at once for any other type.
    """

    def __init__(
        self,
        transport_listener: Listener[T_Stream],
        context: TLSContext | None = None,
        *,
        https_compatible: bool = False,
        ssl_context: TLSContext | None = None,
    ) -> None:
        self.transport_listener = transport_listener
        self._context = _required_context(context, ssl_context)
        self._https_compatible = https_compatible

    async def accept(self) -> TrioTLSStream[T_Stream]:
        """Accept the next connection and wrap it (server side)."""
        transport_stream = await self.transport_listener.accept()
        try:
            return TrioTLSStream(transport_stream, self._context, server_side=True,
                                 https_compatible=self._https_compatible)
        except BaseException:
            await trio.aclose_forcefully(transport_stream)
            raise

    async def aclose(self) -> None:
        """Close the transport listener."""
        await self.transport_listener.aclose()


async def open_tls_over_tcp_stream(
    host: str | bytes,
    port: int,
    *,
    context: TLSContext | None = None,
    https_compatible: bool = False,
    happy_eyeballs_delay: float | None = 0.25,
    ssl_context: TLSContext | None = None,
) -> TrioTLSStream[trio.SocketStream]:
    """Connect over TCP and wrap the connection, like :func:`trio.open_ssl_over_tcp_stream`.

    The certificate must be valid for ``host`` (also sent as SNI).  Without
    ``context`` a :func:`~anyio_asyncssl.create_default_context` (the system
    CA store, host-name checks) is used.  No handshake yet: it happens on the
    first send or receive, or :meth:`TrioTLSStream.do_handshake`.
    ``ssl_context`` is trio's name for ``context``; ``TypeError`` (before
    connecting) for a context that is not a ``TLSContext``.
    """
    context = pick_context(context, ssl_context)
    check_hostname_text(host.decode("ascii") if isinstance(host, bytes) else host)
    if context is None:
        context = create_default_context()
    tcp_stream = await trio.open_tcp_stream(host, port, happy_eyeballs_delay=happy_eyeballs_delay)
    try:
        return TrioTLSStream(tcp_stream, context, server_hostname=host,
                             https_compatible=https_compatible)
    except BaseException:
        await trio.aclose_forcefully(tcp_stream)
        raise


async def open_tls_over_tcp_listeners(
    port: int,
    context: TLSContext | None = None,
    *,
    host: str | bytes | None = None,
    https_compatible: bool = False,
    backlog: int | None = None,
    ssl_context: TLSContext | None = None,
) -> list[TrioTLSListener[trio.SocketStream]]:
    """Listen for TLS over TCP, like :func:`trio.open_ssl_over_tcp_listeners`.

    ``ssl_context`` is trio's name for ``context``; ``TypeError`` (before
    binding) for a context that is not a ``TLSContext``.
    """
    context = _required_context(context, ssl_context)
    tcp_listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    return [TrioTLSListener(tcp_listener, context, https_compatible=https_compatible)
            for tcp_listener in tcp_listeners]


async def serve_tls_over_tcp(
    handler: Callable[[TrioTLSStream[trio.SocketStream]], Awaitable[object]],
    port: int,
    context: TLSContext | None = None,
    *,
    host: str | bytes | None = None,
    https_compatible: bool = False,
    backlog: int | None = None,
    handler_nursery: trio.Nursery | None = None,
    ssl_context: TLSContext | None = None,
    task_status: trio.TaskStatus[
        list[TrioTLSListener[trio.SocketStream]]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler(stream)`` per connection, like :func:`trio.serve_ssl_over_tcp`.

    With ``nursery.start`` it returns the listeners (e.g. to learn the port
    when ``port=0``).  Returns only when cancelled; a handler's exception
    propagates unless ``handler_nursery`` handles it.  ``ssl_context`` is
    trio's name for ``context``.
    """
    context = _required_context(context, ssl_context)
    listeners = await open_tls_over_tcp_listeners(
        port, context, host=host, https_compatible=https_compatible, backlog=backlog)
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery,
                               task_status=task_status)


# trio's names, so a trio program moves over by changing ``trio.`` to
# ``anyio_asyncssl.trio.`` in them (the keywords are trio's too)
SSLStream = TrioTLSStream
SSLListener = TrioTLSListener
open_ssl_over_tcp_stream = open_tls_over_tcp_stream
open_ssl_over_tcp_listeners = open_tls_over_tcp_listeners
serve_ssl_over_tcp = serve_tls_over_tcp


def _required_context(context: object, ssl_context: object) -> TLSContext:
    ctx = pick_context(context, ssl_context)
    if ctx is None:
        raise TypeError("a TLSContext is required (context= or trio's ssl_context=)")
    return ctx


def _busy_error(what: str) -> Exception:
    return trio.BusyResourceError(_BUSY[what])
