"""TLS for asyncio transports: the equivalent of asyncio's ``sslproto`` on our driver.

Theory of operation
-------------------
asyncio's TLS is a protocol stacked on a transport: :class:`TLSProtocol` is
the protocol of the *raw* transport (TCP, or any transport, TLS included),
and :class:`TLSTransport` is the transport the *application* protocol sees,
exactly as ``sslproto.SSLProtocol`` and ``_SSLProtocolTransport`` are.  What
differs is who runs TLS.  asyncio's ``SSLProtocol`` calls ``SSLObject``
methods from its callbacks and cannot wait; OpenSSL's async mode needs a
caller that can: a paused handshake (the private key is being used on an
offload worker) must be retried, later, with the same call.  So the TLS work
here is done by :class:`~anyio_asyncssl.driver.Driver`, the retry loop both
stream faces use, run by tasks of this connection:

* one task does the handshake (bounded by ``ssl_handshake_timeout``), then
  calls the application's ``connection_made`` and becomes the **reader**:
  ``driver.read()`` → ``data_received`` (or a ``BufferedProtocol``'s
  ``get_buffer``/``buffer_updated``), waiting while the application has
  paused reading;
* a **writer** task takes what ``write()`` buffered, in order, and runs
  ``driver.write()``; after ``close()`` it sends what is left, then does the
  closing handshake (bounded by ``ssl_shutdown_timeout``) and closes the raw
  transport.

The driver's ciphertext goes to ``raw.write()`` and waits while the raw
transport has paused our writing; its ciphertext comes from
``data_received`` through a queue that pauses the raw transport's reading
above a high-water mark, so a slow application never makes us buffer
without bound (rule: every buffer bounded).  A paused OpenSSL job is never
abandoned: the driver waits for it inside shielded scopes, so cancelling
these tasks (``abort()``, connection lost) takes effect once the job ends,
and the connection is freed (or parked) only then.

Behaviour copied from asyncio: the application's ``connection_made`` comes
after the handshake; a failed handshake closes the raw transport and fails
the waiter (``create_connection``/``start_tls`` raise it: our
:class:`~anyio_asyncssl.TLSError`, an ``ssl.SSLError``; a handshake over
time is ``ConnectionAbortedError``, a peer gone during it
``ConnectionResetError``); a close_notify or an EOF from the peer calls
``eof_received`` and then closes; ``close()`` flushes, sends close_notify
and closes; ``abort()`` drops everything; ``connection_lost`` is called once,
with the error that ended the connection or ``None``.  Beyond asyncio:
``write_eof()`` on TLS 1.3 sends close_notify and keeps receiving (a real
half-close; ``can_write_eof()`` says whether the version allows it), and an
``eof_received`` that returns true keeps a TLS 1.3 connection open for
writing.

References go one way, so a connection is freed when its last reference
goes, not by the cycle collector (a server's SSL objects would otherwise
pile up between collections): the application's transport and protocol
hold this protocol, the driver reaches it only through a weak reference,
and ``connection_lost`` drops its application transport and protocol, as
``sslproto`` does (``get_protocol()`` is ``None`` after it); a finished
task's ``CancelledError`` (its traceback holds our frames) is not kept.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from asyncio import constants as asyncio_constants
from asyncio import transports as asyncio_transports
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from .connection import TLSConnection
from .context import TLSContext, require_tls_context
from .driver import Driver, StreamBroken, StreamClosed
from .errors import TLSEOFError

__all__ = ["TLSProtocol", "TLSTransport"]

logger = logging.getLogger(__name__)

SSL_HANDSHAKE_TIMEOUT = 60.0     # asyncio.constants
SSL_SHUTDOWN_TIMEOUT = 30.0
READ_HIGH_WATER = 256 * 1024     # asyncio's FLOW_CONTROL_HIGH_WATER_SSL_READ
WRITE_HIGH_WATER = 512 * 1024    # asyncio's FLOW_CONTROL_HIGH_WATER_SSL_WRITE
MAX_READ = 256 * 1024            # the most one data_received carries
MAX_WRITE_CHUNK = 256 * 1024     # the most one driver.write() takes
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5   # asyncio.constants


def _water_marks(high: int | None, low: int | None, default_high: int) -> tuple[int, int]:
    """asyncio's rule for (high, low) defaults and checks."""
    if high is None:
        high = default_high if low is None else 4 * low
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
    return high, low


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class TLSTransport(asyncio_transports._FlowControlMixin, asyncio.Transport):
    """The transport the application protocol sees (``_SSLProtocolTransport``'s role)."""

    _start_tls_compatible = True   # start_tls() may stack TLS on this transport
    # loop.sendfile() reads the file and write()s it, as on asyncio's TLS
    # transport; its fallback wants a _FlowControlMixin with _loop and
    # _protocol_paused (aiohttp's FileResponse uses it)
    _sendfile_compatible = asyncio_constants._SendfileMode.FALLBACK

    def __init__(self, tls: TLSProtocol) -> None:
        asyncio.Transport.__init__(self)   # not the mixin's: TLSProtocol does flow control
        self._loop = tls.loop
        self._tls = tls
        self._closed = False

    # -- information ----------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``sslcontext``, ``ssl_object``, ``peercert``, ``cipher``, ``compression``,
        then the raw transport's keys (``socket``, ``peername``, ``sockname``, ...)."""
        return self._tls.extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.set_app_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        # None once the connection is lost, as asyncio's TLS transport answers
        # (typeshed's signature has no None)
        return self._tls.app_protocol  # type: ignore[return-value]

    def is_closing(self) -> bool:
        return self._closed

    # -- closing --------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the buffered data, send close_notify, then close; no more data is received."""
        if not self._closed:
            self._closed = True
            self._tls.start_shutdown()

    def abort(self) -> None:
        """Close at once: buffered data is lost, no closing handshake."""
        self._closed = True
        self._tls.abort()

    # -- reading --------------------------------------------------------------------------
    def is_reading(self) -> bool:
        return not self._tls.app_reading_paused

    def pause_reading(self) -> None:
        self._tls.pause_app_reading()

    def resume_reading(self) -> None:
        self._tls.resume_app_reading()

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_read_limits(high, low)

    def get_read_buffer_limits(self) -> tuple[int, int]:
        return self._tls.read_low, self._tls.read_high

    def get_read_buffer_size(self) -> int:
        return self._tls.incoming_size

    # -- writing --------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; the writer task encrypts and sends it in order."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        if data:
            self._tls.write_app_data((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._tls.write_app_data(list_of_data)

    def write_eof(self) -> None:
        """TLS 1.3: send close_notify after the buffered data and keep receiving."""
        if not self.can_write_eof():
            raise NotImplementedError("half-close needs TLS 1.3 (TLS 1.2 close_notify closes "
                                      "both directions)")
        self._tls.start_write_eof()

    def can_write_eof(self) -> bool:
        return self._tls.version() == "TLSv1.3"

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.write_low, self._tls.write_high

    def get_write_buffer_size(self) -> int:
        return self._tls.write_buffer_size

    @property
    def _protocol_paused(self) -> bool:
        # asyncio's sendfile fallback reads this
        return self._tls.app_writing_paused

    def __repr__(self) -> str:
        return f"<anyio_asyncssl TLSTransport closed={self._closed} {self._tls.conn!r}>"


class TLSProtocol(asyncio.Protocol):
    """The raw transport's protocol: TLS on our driver, for an application protocol.

    ``waiter`` (a future) gets ``None`` once the handshake is done, or the
    handshake's error.  ``call_connection_made=False`` (``start_tls``): the
    application protocol was connected already.  Raises ``TypeError`` for a
    context that is not a :class:`~anyio_asyncssl.TLSContext`, ``ValueError``
    for a non-positive timeout or a missing ``server_hostname`` when the
    context checks host names.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        context: TLSContext,
        waiter: asyncio.Future[None] | None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        call_connection_made: bool = True,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> None:
        context = require_tls_context(context, "ssl")
        for name, value in (("ssl_handshake_timeout", ssl_handshake_timeout),
                            ("ssl_shutdown_timeout", ssl_shutdown_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} should be a positive number, got {value}")
        self.loop = loop
        self.context = context
        self.conn = TLSConnection(context, server_side=server_side,
                                  server_hostname=server_hostname or None)
        self.driver = Driver(self.conn, *_ciphertext_io(self))
        self._waiter = waiter
        self._handshake_timeout = ssl_handshake_timeout or SSL_HANDSHAKE_TIMEOUT
        self._shutdown_timeout = ssl_shutdown_timeout or SSL_SHUTDOWN_TIMEOUT
        self._call_connection_made = call_connection_made
        self.app_protocol: asyncio.BaseProtocol | None = app_protocol
        self._app_is_buffered = False
        self.set_app_protocol(app_protocol)
        self.app_transport: TLSTransport | None = TLSTransport(self)   # None once lost
        self._raw: asyncio.BaseTransport | None = None
        self._extra: dict[str, Any] = {"sslcontext": context}
        # state
        self._app_connected = False      # connection_made was called (or not needed)
        self._app_lost = False           # connection_lost was called
        self._handshake_done = False
        self._shutting_down = False
        self._eof_requested = False
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._main_task: asyncio.Task[None] | None = None   # handshake, then reading
        # ciphertext from the raw transport
        self._incoming: collections.deque[bytes] = collections.deque()
        self.incoming_size = 0
        self._incoming_eof = False
        self._incoming_ready = asyncio.Event()
        self.read_high, self.read_low = _water_marks(None, None, READ_HIGH_WATER)
        self._raw_reading_paused = False
        # the raw transport's flow control of our writes
        self._raw_can_write = asyncio.Event()
        self._raw_can_write.set()
        # application data to send
        self._backlog: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self.write_buffer_size = 0
        self._backlog_ready = asyncio.Event()
        self.write_high, self.write_low = _water_marks(None, None, WRITE_HIGH_WATER)
        self.app_writing_paused = False
        self._writes_after_close = 0
        # application reading
        self.app_reading_paused = False
        self._app_can_read = asyncio.Event()
        self._app_can_read.set()

    def set_app_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app_protocol = protocol
        self._app_is_buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def _mark_app_closed(self) -> None:
        if self.app_transport is not None:
            self.app_transport._closed = True

    def version(self) -> str | None:
        return self.conn.version() if self._handshake_done else None

    def extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        if self._raw is not None:
            return self._raw.get_extra_info(name, default)
        return default

    # -- the raw transport's callbacks ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._main_task = self._spawn(self._run())
        # a finished task keeps its CancelledError, whose traceback's frames hold
        # self: kept here, the protocol and its SSL object would wait for the cycle
        # collector instead of going when the last reference does
        self._main_task.add_done_callback(self._forget_main_task)

    def data_received(self, data: bytes) -> None:
        self._incoming.append(data)
        self.incoming_size += len(data)
        self._incoming_ready.set()
        if self.incoming_size > self.read_high and not self._raw_reading_paused:
            self._raw_reading_paused = True
            self._raw.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._incoming_eof = True
        self._incoming_ready.set()
        return True    # we close the raw transport ourselves, after the TLS close

    def pause_writing(self) -> None:
        self._raw_can_write.clear()

    def resume_writing(self) -> None:
        self._raw_can_write.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._raw_can_write.set()
        self._incoming_eof = True
        self._incoming_ready.set()
        for task in self._tasks:
            task.cancel()
        if not self._handshake_done:
            self._wake_waiter(self._error or exc or ConnectionResetError(
                "the connection was lost during the TLS handshake"))
        self._mark_app_closed()
        if self._app_connected and not self._app_lost and self.app_protocol is not None:
            self._app_lost = True
            lost: Any = self.app_protocol.connection_lost
            self.loop.call_soon(lost, self._error or exc)
        self._backlog.clear()
        self.write_buffer_size = 0
        # the application's objects hold us, we no longer hold them (see the top)
        self.app_transport = None
        self.app_protocol = None

    # -- the driver's transport ------------------------------------------------------
    async def _send_ciphertext(self, data: bytes) -> None:
        # never waits: a read may have to send (a KeyUpdate answer, queued
        # output) while the writer waits for the peer to read; if the send
        # waited for the raw transport, two peers writing bulk data to each
        # other would each wait for the other's reader.  The writer task waits
        # for the raw transport's resume_writing() before each chunk instead,
        # so the raw buffer holds at most its high-water mark plus one chunk.
        raw = self._raw
        if raw is None or raw.is_closing():
            raise ConnectionResetError("the connection is closed")
        raw.write(data)  # type: ignore[attr-defined]

    async def _receive_ciphertext(self) -> bytes:
        while not self._incoming:
            if self._incoming_eof:
                return b""
            self._incoming_ready.clear()
            await self._incoming_ready.wait()
        data = self._incoming.popleft()
        self.incoming_size -= len(data)
        if self._raw_reading_paused and self.incoming_size <= self.read_low:
            self._raw_reading_paused = False
            if self._raw is not None and not self._raw.is_closing():
                self._raw.resume_reading()  # type: ignore[attr-defined]
        return data

    # -- the connection's tasks --------------------------------------------------------
    def _forget_main_task(self, task: asyncio.Task[None]) -> None:
        if self._main_task is task:
            self._main_task = None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        """Handshake, then read for the application until EOF or an error."""
        try:
            with anyio.fail_after(self._handshake_timeout):
                await self.driver.handshake()
        except TimeoutError:
            self._fatal(ConnectionAbortedError(
                f"SSL handshake is taking longer than {self._handshake_timeout} seconds: "
                "aborting the connection"), "SSL handshake failed")
            return
        except TLSEOFError as exc:
            error = ConnectionResetError("the peer closed the connection during the TLS "
                                         "handshake")
            error.__cause__ = exc
            self._fatal(error, "SSL handshake failed")
            return
        except (OSError, StreamBroken, StreamClosed) as exc:
            self._fatal(exc, "SSL handshake failed")
            return
        self._handshake_done = True
        conn = self.conn
        self._extra.update(peercert=conn.getpeercert(), cipher=conn.cipher(),
                           compression=None, ssl_object=conn)
        if self._call_connection_made:
            if self.app_protocol is None or self.app_transport is None:
                return      # lost while the handshake finished: nobody to tell
            try:
                self.app_protocol.connection_made(self.app_transport)
            except Exception as exc:
                self._fatal(exc, "protocol.connection_made() failed")
                return
        self._app_connected = True
        self._wake_waiter(None)
        self._spawn(self._write_loop())
        if self._backlog:
            self._backlog_ready.set()
        await self._read_loop()

    async def _read_loop(self) -> None:
        while True:
            if not self._app_can_read.is_set():
                await self._app_can_read.wait()
            try:
                data = await self.driver.read(MAX_READ)
            except TLSEOFError:
                data = b""    # the peer's EOF without close_notify: asyncio's EOF too
            except (OSError, StreamBroken) as exc:
                self._fatal(exc)
                return
            except StreamClosed:
                return
            if not data:
                self._on_peer_eof()
                return
            try:
                self._deliver(data)
            except Exception as exc:
                self._fatal(exc, "Fatal error: protocol.data_received() call failed.")
                return

    def _deliver(self, data: bytes) -> None:
        protocol = self.app_protocol
        if protocol is None:
            return          # lost: asyncio delivers nothing after connection_lost
        if not self._app_is_buffered:
            protocol.data_received(data)  # type: ignore[attr-defined]
            return
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(view.nbytes))  # type: ignore[attr-defined]
            n = min(buf.nbytes, view.nbytes)
            if n == 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]

    def _on_peer_eof(self) -> None:
        keep_open = False
        protocol, transport = self.app_protocol, self.app_transport
        if protocol is None or transport is None:
            return          # lost already
        try:
            keep_open = bool(protocol.eof_received())  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "Error calling eof_received()")
            return
        if keep_open and self.version() == "TLSv1.3" and not transport._closed:
            return     # a half-close: the application may go on writing
        transport._closed = True
        self.start_shutdown()

    async def _write_loop(self) -> None:
        driver = self.driver
        try:
            while True:
                if not self._backlog:
                    if self._shutting_down:
                        break
                    if self._eof_requested and not driver.eof_sent:
                        await driver.send_eof()
                        continue
                    self._backlog_ready.clear()
                    await self._backlog_ready.wait()
                    continue
                if not self._raw_can_write.is_set():
                    await self._raw_can_write.wait()
                chunk = self._take_chunk()
                await driver.write(chunk)
                self.write_buffer_size -= _nbytes(chunk)
                self._control_app_writing()
            await self._close_tls()
        except (OSError, StreamBroken, StreamClosed) as exc:
            self._fatal(exc)

    def _take_chunk(self) -> bytes | bytearray | memoryview:
        """At most MAX_WRITE_CHUNK bytes from the front of the backlog.

        A larger write is taken a slice at a time: the writer waits for the
        raw transport between chunks, and one write() of many megabytes
        would otherwise be encrypted into the raw transport's buffer whole.
        """
        first = self._backlog.popleft()
        if _nbytes(first) > MAX_WRITE_CHUNK:
            view = memoryview(first).cast("B")
            self._backlog.appendleft(view[MAX_WRITE_CHUNK:])
            return view[:MAX_WRITE_CHUNK]
        if not self._backlog or _nbytes(first) == MAX_WRITE_CHUNK:
            return first
        parts = [first]
        size = _nbytes(first)
        while self._backlog and size + _nbytes(self._backlog[0]) <= MAX_WRITE_CHUNK:
            part = self._backlog.popleft()
            parts.append(part)
            size += _nbytes(part)
        return b"".join(parts)

    async def _close_tls(self) -> None:
        """close(): send close_notify, wait (bounded) for the peer's, close the raw transport."""
        driver = self.driver
        try:
            with anyio.move_on_after(self._shutdown_timeout) as scope:
                if not self.conn.close_notify_received and not self._incoming_eof:
                    await driver.unwrap()
                else:
                    await driver.send_close_notify()
            if scope.cancelled_caught:
                self._fatal(TimeoutError("SSL shutdown timed out"))
                return
        except (OSError, StreamBroken, StreamClosed):
            pass   # the peer went first: nothing more to say to it
        if self._raw is not None:
            self._raw.close()

    # -- what the application transport asks -------------------------------------------
    def write_app_data(self, items: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._shutting_down or self._eof_requested or self._app_lost:
            # asyncio drops writes after close, and says so from the fifth on
            self._writes_after_close += 1
            if self._writes_after_close >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("SSL connection is closed")
            return
        for data in items:
            n = _nbytes(data)
            if n:
                self._backlog.append(bytes(data) if not isinstance(data, bytes) else data)
                self.write_buffer_size += n
        if self._handshake_done:
            self._backlog_ready.set()
        self._control_app_writing()

    def _control_app_writing(self) -> None:
        size = self.write_buffer_size
        protocol = self.app_protocol
        if protocol is None:
            return
        try:
            if size >= self.write_high and not self.app_writing_paused:
                self.app_writing_paused = True
                protocol.pause_writing()
            elif size <= self.write_low and self.app_writing_paused:
                self.app_writing_paused = False
                protocol.resume_writing()
        except Exception as exc:
            self.loop.call_exception_handler({
                "message": "protocol.pause_writing() or resume_writing() failed",
                "exception": exc, "transport": self.app_transport,
                "protocol": protocol})

    def set_write_limits(self, high: int | None, low: int | None) -> None:
        self.write_high, self.write_low = _water_marks(high, low, WRITE_HIGH_WATER)
        self._control_app_writing()

    def set_read_limits(self, high: int | None, low: int | None) -> None:
        self.read_high, self.read_low = _water_marks(high, low, READ_HIGH_WATER)

    def pause_app_reading(self) -> None:
        self.app_reading_paused = True
        self._app_can_read.clear()

    def resume_app_reading(self) -> None:
        self.app_reading_paused = False
        self._app_can_read.set()

    def start_write_eof(self) -> None:
        self._eof_requested = True
        self._backlog_ready.set()

    def start_shutdown(self) -> None:
        """close(): stop reading; the writer flushes, then closes TLS and the raw transport."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._mark_app_closed()
        if not self._handshake_done:
            self.abort()
            return
        if self._main_task is not None:
            self._main_task.cancel()   # the reader: no more data for the application
        self._backlog_ready.set()

    def abort(self, exc: BaseException | None = None) -> None:
        self._mark_app_closed()
        if exc is not None and self._error is None:
            self._error = exc
        for task in list(self._tasks):
            task.cancel()
        if self._raw is not None:
            self._raw.abort()  # type: ignore[attr-defined]

    def _fatal(self, exc: BaseException, message: str = "Fatal error on TLS transport") -> None:
        """End the connection with ``exc``: the waiter or connection_lost gets it."""
        if self._error is None:
            self._error = exc
        if not isinstance(exc, OSError | asyncio.CancelledError):
            self.loop.call_exception_handler({
                "message": message, "exception": exc,
                "transport": self.app_transport, "protocol": self})
        self._wake_waiter(exc)
        self.abort()

    def _wake_waiter(self, exc: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    def __repr__(self) -> str:
        return f"<anyio_asyncssl TLSProtocol {self.conn!r}>"


def _ciphertext_io(tls: TLSProtocol) -> tuple[Callable[[bytes], Awaitable[None]],
                                              Callable[[], Awaitable[bytes]]]:
    """The driver's send and receive for ``tls``, through a weak reference.

    Bound methods would make protocol -> driver -> protocol a cycle.  The
    driver is only ever run by this protocol's tasks, whose frames hold it,
    so the reference is alive whenever these are called.
    """
    ref = weakref.ref(tls)

    def send(data: bytes) -> Awaitable[None]:
        tls = ref()
        if tls is None:
            raise ConnectionResetError("the connection is closed")
        return tls._send_ciphertext(data)

    def receive() -> Awaitable[bytes]:
        tls = ref()
        if tls is None:
            raise ConnectionResetError("the connection is closed")
        return tls._receive_ciphertext()

    return send, receive

