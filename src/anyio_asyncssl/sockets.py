"""The native socket path: taking a kernel socket over from its transport stream.

Theory of operation
-------------------
When a TLS stream's transport is a kernel socket, OpenSSL reads and writes
the socket itself (``_native/sockbio.c``): no ciphertext crosses Python.  The
driver then waits on the socket's fd only when a step answers WANT_READ or
WANT_WRITE.  :func:`take_over` recognises the transports it can take
(anyio's socket streams on both backends, ``trio.SocketStream``) and returns
a :class:`SocketIO`; anything else (TLS in TLS, memory streams, custom
streams) returns ``None`` and keeps the memory-BIO path.

What a takeover must not lose or break:

* **asyncio** (and uvloop): anyio's socket stream sits on an asyncio
  transport whose protocol may already hold received bytes.  Reading is
  paused except inside ``receive()``, so after ``pause_reading()`` the
  transport never touches the socket again as long as nobody calls its
  ``write()``; its buffered bytes become the BIO's first input (nothing
  lost).  A transport with unsent data, or one that failed, is not taken.
  The loop refuses ``add_reader`` on an fd a transport owns, so we wait on
  (and do I/O through) a ``dup()`` of it, closed with the stream and
  whenever the transport loses its connection (its protocol's
  ``connection_lost``); the transport keeps and finally closes the original.
* **trio**: ``trio.SocketStream`` buffers nothing; we use its fd as is.

The fd number is used only while the transport's socket is open
(:attr:`SocketIO.alive`, checked before every step): once closed, the
kernel may give the number to another file.

Waiting: one task at a time waits per direction (trio refuses two waiters
on one fd, asyncio would silently replace the first).  A task that finds
another one waiting waits for that wait to end and then retries its step
instead of waiting on the fd itself: the readiness it wanted may have been
consumed by the other task's step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["SocketIO", "kernel_tls_available", "take_over"]


def kernel_tls_available() -> bool:
    """Whether this kernel offers kTLS (the ``tls`` TCP upper-layer protocol).

    Reported, not used: kTLS needs OpenSSL's own socket BIO, and ours keeps
    unwrap's trailing bytes and the transport's buffered ones, which
    OpenSSL's read-ahead would swallow.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


class SocketIO:
    """A socket fd the driver does I/O on through OpenSSL, and how to wait on it.

    ``origin`` is the transport's own socket object: once it is closed
    (``fileno()`` is -1) the stream is over, and the fd number must never be
    used again (the kernel may already have given it to another file).
    """

    def __init__(self, fd: int, prefix: bytes,
                 wait_readable: Callable[[int], Awaitable[Any]],
                 wait_writable: Callable[[int], Awaitable[Any]],
                 origin: Any, owned: bool) -> None:
        self.fd = fd
        self.prefix = prefix            # bytes the transport had read already
        self._wait_readable = wait_readable
        self._wait_writable = wait_writable
        self._origin = origin
        self._owned = owned             # a dup() of ours: closed by close()
        # per direction: whether a task waits on the fd, and the event the
        # others wait on (made only when a second task comes: most never do)
        self._busy = [False, False]
        self._done: list[anyio.Event | None] = [None, None]
        #: called once by close(), before the fd goes (the connection forgets it)
        self.on_close: Callable[[], None] | None = None

    @property
    def alive(self) -> bool:
        """Whether the socket is still open (ours and the transport's)."""
        return self.fd >= 0 and self._origin.fileno() != -1

    async def readable(self) -> None:
        """Wait until the fd is readable (or until another task's wait ended)."""
        await self._wait(0, self._wait_readable)

    async def writable(self) -> None:
        """Wait until the fd is writable (or until another task's wait ended)."""
        await self._wait(1, self._wait_writable)

    async def _wait(self, d: int, wait: Callable[[int], Awaitable[Any]]) -> None:
        if self._busy[d]:
            # another task waits in this direction: when it is done, our step
            # is retried (the readiness may be gone, consumed by its step)
            done = self._done[d]
            if done is None:
                done = self._done[d] = anyio.Event()
            await done.wait()
            return
        self._busy[d] = True
        try:
            await wait(self.fd)
        finally:
            self._busy[d] = False
            done, self._done[d] = self._done[d], None
            if done is not None:
                done.set()

    def close(self) -> None:
        """The stream is done with the socket: forget the fd; close it if it is our dup.

        Wakes any task waiting on it (with ClosedResourceError).  Idempotent.
        """
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        # dropped, not only called: on asyncio the transport's protocol keeps
        # us (its connection_lost hook), and through this the connection
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        if self._owned:
            try:
                anyio.notify_closing(fd)
            except RuntimeError:   # no running loop: nobody can be waiting
                pass
            os.close(fd)

    def __del__(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def take_over(transport: Any) -> SocketIO | None:
    """A :class:`SocketIO` for ``transport`` if it is a socket stream we can take, else None.

    Call before any TLS byte is sent or received on ``transport``; from
    then on nobody else may use it for I/O (closing it is fine).
    """
    module = type(transport).__module__
    if module == "anyio._backends._asyncio":
        return _take_asyncio(transport)
    if module == "anyio._backends._trio":
        inner = getattr(transport, "_trio_socket", None)
        if inner is None:
            return None
        return SocketIO(inner.fileno(), b"", anyio.wait_readable, anyio.wait_writable,
                        origin=inner, owned=False)
    trio = sys.modules.get("trio")
    if trio is not None and type(transport) is trio.SocketStream:
        sock = transport.socket
        return SocketIO(sock.fileno(), b"", trio.lowlevel.wait_readable,
                        trio.lowlevel.wait_writable, origin=sock, owned=False)
    return None


def _take_asyncio(stream: Any) -> SocketIO | None:
    transport = getattr(stream, "_transport", None)
    protocol = getattr(stream, "_protocol", None)
    prefix = b""
    if transport is not None:
        # anyio's SocketStream on an asyncio (or uvloop) transport
        queue = getattr(protocol, "read_queue", None)
        if (queue is None or transport.is_closing() or getattr(protocol, "exception", None)
                or transport.get_write_buffer_size()):
            return None
        transport.pause_reading()
        prefix = b"".join(queue)
        queue.clear()
        protocol.read_event.clear()  # type: ignore[union-attr]
        sock = transport.get_extra_info("socket")
    else:
        # anyio's raw-socket streams (UNIX sockets): no buffer of their own
        sock = getattr(stream, "_raw_socket", None)
    if sock is None:
        return None
    io = SocketIO(os.dup(sock.fileno()), prefix, anyio.wait_readable, anyio.wait_writable,
                  origin=sock, owned=True)
    if protocol is not None:
        # our dup keeps the connection open: when the transport goes (its
        # aclose(), an abort, a reset), ours must go with it
        lost = protocol.connection_lost

        def connection_lost(exc: BaseException | None) -> None:
            io.close()
            lost(exc)

        protocol.connection_lost = connection_lost
    return io
