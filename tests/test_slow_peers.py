"""Slow and idle peers: handshake timeouts, and buffers a slow peer cannot grow.

Theory of operation
-------------------
Two ways a peer can make a server spend resources without doing any work:

* **it never finishes its handshake** (connects and says nothing, or sends
  half a ClientHello and stalls).  The listener's handshake timeout must close
  it, report it as the stdlib or anyio would, never call the handler, and
  leave no descriptor behind; 200 such peers at once must not delay a good
  client.
* **it reads slowly, or floods us while our application does not read.**  A
  send must then block (backpressure) instead of queueing ciphertext, and we
  must stop reading from the socket instead of queueing what arrives.

Every server face is tested: the anyio listener on both backends, the trio
listener (whose handshake is lazy: the handler bounds it, as with
``trio.SSLListener``), and the asyncio layer (``create_server`` with
``ssl_handshake_timeout``).  The same test runs the standard library's
equivalent (anyio's ``TLSListener``, ``trio.SSLListener``, asyncio's
``sslproto``, all on ``ssl.SSLContext``) with the same peer, so each bound is
measured against the implementation users move from, not picked at random.

How buffered bytes are counted without trusting the server: the peer is a raw
socket driven by the stdlib's ``SSLObject`` on memory BIOs, which counts every
ciphertext byte it gives to or takes from the kernel.  What the kernel holds
between the two is read with ``SIOCOUTQ`` (the server socket's unsent and
unacknowledged bytes) and ``SIOCINQ`` (the client socket's unread bytes).  By
conservation, the bytes the server's application handed to ``send()`` that
are in neither the kernel nor the client are held in user space by the
server's TLS stack (Python queues, OpenSSL buffers, transports), whatever
holds them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import gc
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener as StdlibAnyioListener
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl import asyncio as AA
from anyio_asyncssl.stream import AsyncTLSListener

pytestmark = pytest.mark.anyio

TIMEOUT = 30              # generous: 2 shared cores
HANDSHAKE_TIMEOUT = 0.5
KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB          # what the slow-reader servers send per call
RECORD_OVERHEAD = 22      # TLS 1.3 AEAD record: 5 header + 1 type + 16 tag
RECORD_PLAIN = 16 * KIB

# (server face, anyio backend)
KINDS = [("anyio", "asyncio"), ("anyio", "trio"), ("trio", "trio"), ("asyncio", "asyncio")]
KIND_IDS = ["anyio-asyncio", "anyio-trio", "trio", "asyncio"]


# -- measuring ----------------------------------------------------------------------
def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled_fd_count() -> int:
    """The descriptor count once closings still under way are done (bounded)."""
    counts = [fd_count()]
    with anyio.move_on_after(5):
        while len(counts) < 3 or len(set(counts[-3:])) > 1:
            await anyio.sleep(0.02)
            counts.append(fd_count())
    return counts[-1]


def accept_queue(port: int) -> int:
    """Connections waiting in the listen backlog of 127.0.0.1:``port`` (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":   # LISTEN: rx_queue is the backlog
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2).

    Unlike the RSS, not hidden by memory an earlier test freed and malloc
    kept: what OpenSSL and Python's large objects hold right now.
    """
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def kernel_queued(fd: int, request: int) -> int:
    buf = fcntl.ioctl(fd, request, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


SIOCOUTQNSD = 0x894B
FIONREAD = 0x541B      # SIOCINQ


def unsent(fd: int) -> int:
    """SIOCOUTQNSD: bytes in the socket's send queue not sent yet.

    (Not SIOCOUTQ: that counts sent bytes until they are acknowledged, and on
    loopback they may be in the peer's receive queue already.)
    """
    return kernel_queued(fd, SIOCOUTQNSD)


def unread(fd: int) -> int:
    """SIOCINQ: bytes in the socket's receive queue."""
    return kernel_queued(fd, FIONREAD)


def ciphertext_size(plaintext: int) -> int:
    """An upper bound on the TLS 1.3 records carrying ``plaintext`` bytes in 16 KiB records."""
    return plaintext + -(-plaintext // RECORD_PLAIN) * RECORD_OVERHEAD


# -- the peer: a counting TLS client on a raw socket ------------------------------------
def client_hello() -> bytes:
    """A real ClientHello, from the stdlib's ssl on memory BIOs."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 22 and len(hello) > 100, hello[:8]   # a handshake record
    return hello


async def raw_connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        err = sock.connect_ex(("127.0.0.1", port))
        if err == errno.EINPROGRESS:
            with anyio.fail_after(TIMEOUT):
                await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_closed_by_peer(sock: socket.socket) -> None:
    """Wait (bounded by the caller) until the server closes: EOF or a reset."""
    while True:
        await anyio.wait_readable(sock)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return
        if not data:
            return


class CountingClient:
    """A TLS 1.3 client over a raw non-blocking socket, counting its ciphertext.

    ``pushed``: bytes the kernel accepted from us; ``pulled``: bytes we read
    from the kernel.  Neither includes the handshake.
    """

    def __init__(self, pki: Pki, sock: socket.socket) -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.sock = sock
        self.pushed = 0
        self.pulled = 0
        self.sent_plain = 0

    @classmethod
    async def connect(cls, pki: Pki, port: int) -> CountingClient:
        """Connect and do the handshake."""
        client = cls(pki, await raw_connect(port))
        try:
            await client._handshake()
        except BaseException:
            client.close()
            raise
        return client

    async def _handshake(self) -> None:
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                await self._push(self.outgoing.read())
                await anyio.wait_readable(self.sock)
                data = self.sock.recv(65536)
                assert data, "the server closed during the handshake"
                self.incoming.write(data)
            await self._push(self.outgoing.read())
        self.pushed = self.pulled = 0

    async def _push(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            self.pushed += n
            view = view[n:]

    async def flood(self, total: int) -> None:
        """Send ``total`` bytes of application data in CHUNK-sized writes."""
        chunk = b"f" * CHUNK
        while self.sent_plain < total:
            self.obj.write(chunk)
            await self._push(self.outgoing.read())
            self.sent_plain += CHUNK

    def pull(self, limit: int) -> None:
        """Read at most ``limit`` ciphertext bytes the kernel has for us (no waiting)."""
        try:
            self.pulled += len(self.sock.recv(limit))
        except BlockingIOError:
            pass

    async def read_slowly(self, bytes_per_ms: int) -> None:
        """A slow reader: ``bytes_per_ms`` ciphertext bytes each millisecond (0: none)."""
        while True:
            await anyio.sleep(0.001)
            if bytes_per_ms:
                self.pull(bytes_per_ms)

    def close(self) -> None:
        self.sock.close()


# -- the servers under test ---------------------------------------------------------------
@dataclass
class Served:
    """One running server: where it listens and what it reported."""

    port: int
    #: the types of the handshake failures the face reported (listener hook, handler)
    handshake_errors: list[type[BaseException]] = field(default_factory=list)
    #: the asyncio loop's exception handler calls
    loop_errors: list[dict[str, Any]] = field(default_factory=list)
    handled: int = 0
    #: what ended handlers early (a peer that went away)
    handler_errors: list[type[BaseException]] = field(default_factory=list)


@dataclass
class Conn:
    """What a server handler gets, whatever the face: send, receive, the socket fd."""

    send: Callable[[bytes], Awaitable[None]]
    receive: Callable[[], Awaitable[bytes]]
    fd: int
    #: the asyncio faces: the protocol's pause_writing calls, the largest write buffer
    protocol: Any = None
    transport: Any = None


Handler = Callable[[Conn], Awaitable[None]]


def our_server_ctx(pki: Pki, offload: A.Offload) -> A.TLSContext:
    return pki.server_ctx("rsa", offload=offload)


def stdlib_server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.rsa_file)
    return ctx


def _recording(cls: type[Any], served: Served) -> type[Any]:
    """The listener class with its handle_handshake_error recorded, then run as usual."""

    class Recording(cls):  # type: ignore[misc]  # cls: one of several listener classes
        async def handle_handshake_error(self, exc: BaseException, stream: Any) -> None:
            try:
                await super().handle_handshake_error(exc, stream)
            finally:
                served.handshake_errors.append(type(exc))   # the type: no frames kept

    return Recording


@asynccontextmanager
async def serving(kind: str, impl: str, pki: Pki, offload: A.Offload, handler: Handler,
                  handshake_timeout: float = HANDSHAKE_TIMEOUT) -> AsyncIterator[Served]:
    """Run ``handler`` for each connection on the ``kind`` face, ours or the stdlib's."""
    ctx: Any = our_server_ctx(pki, offload) if impl == "ours" else stdlib_server_ctx(pki)
    if kind == "anyio":
        async with _serving_anyio(impl, ctx, handler, handshake_timeout) as served:
            yield served
    elif kind == "trio":
        async with _serving_trio(impl, ctx, handler, handshake_timeout) as served:
            yield served
    else:
        async with _serving_asyncio(impl, ctx, handler, handshake_timeout) as served:
            yield served


async def _guarded(served: Served, handler: Handler, conn: Conn) -> None:
    served.handled += 1
    try:
        await handler(conn)
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream,
            anyio.ClosedResourceError) as exc:
        # the peer went away: the tests check what they need themselves
        served.handler_errors.append(type(exc))


@asynccontextmanager
async def _serving_anyio(impl: str, ctx: Any, handler: Handler,
                         handshake_timeout: float) -> AsyncIterator[Served]:
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    served = Served(int(tcp.extra(SocketAttribute.local_port)))
    base = AsyncTLSListener if impl == "ours" else StdlibAnyioListener
    listener = _recording(base, served)(tcp, ctx, handshake_timeout=handshake_timeout)

    async def handle(stream: Any) -> None:
        fd = stream.extra(SocketAttribute.raw_socket).fileno()
        try:
            await _guarded(served, handler, Conn(stream.send, stream.receive, fd))
        finally:
            await anyio.aclose_forcefully(stream)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            yield served
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


@asynccontextmanager
async def _serving_trio(impl: str, ctx: Any, handler: Handler,
                        handshake_timeout: float) -> AsyncIterator[Served]:
    import trio

    from anyio_asyncssl.trio import TrioTLSListener

    (tcp,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    served = Served(tcp.socket.getsockname()[1])
    listener: Any = (TrioTLSListener(tcp, ctx) if impl == "ours"
                     else trio.SSLListener(tcp, ctx))

    async def handle(stream: Any) -> None:
        # trio's listeners hand out streams whose handshake is lazy: bounding
        # it is the handler's job (trio's documented way)
        try:
            try:
                with trio.fail_after(handshake_timeout):
                    await stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                served.handshake_errors.append(type(exc))
                return
            fd = stream.transport_stream.socket.fileno()
            await _guarded(served, handler, Conn(stream.send_all, stream.receive_some, fd))
        finally:
            await trio.aclose_forcefully(stream)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(trio.serve_listeners, handle, [listener])
            yield served
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


class _FlowRecorder(asyncio.StreamReaderProtocol):
    """asyncio.start_server's protocol, counting pause_writing calls."""

    pauses = 0

    def pause_writing(self) -> None:
        self.pauses += 1
        super().pause_writing()


@asynccontextmanager
async def _serving_asyncio(impl: str, ctx: Any, handler: Handler,
                           handshake_timeout: float) -> AsyncIterator[Served]:
    loop = asyncio.get_running_loop()
    served = Served(0)
    tasks: set[asyncio.Task[None]] = set()
    transports: list[asyncio.BaseTransport] = []

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def run() -> None:
            fd = writer.get_extra_info("socket").fileno()
            try:
                await _guarded(served, handler, Conn(send, lambda: reader.read(65536), fd,
                                                     protocol=writer._protocol,  # type: ignore[attr-defined]
                                                     transport=writer.transport))
            finally:
                writer.close()   # flushes what the handler wrote (abort would drop it)

        transports.append(writer.transport)
        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def factory() -> asyncio.BaseProtocol:
        return _FlowRecorder(asyncio.StreamReader(), connected)

    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: served.loop_errors.append(context))
    create = AA.create_server if impl == "ours" else loop.create_server
    server = await create(factory, "127.0.0.1", 0, ssl=ctx, backlog=1000,
                          ssl_handshake_timeout=handshake_timeout)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in transports:
            transport.abort()  # type: ignore[attr-defined]  # a peer that never read
        await server.wait_closed()
        loop.set_exception_handler(old_handler)


async def echo_once(conn: Conn) -> None:
    await conn.send(await conn.receive())


async def good_client(pki: Pki, port: int, served: Served | None = None) -> float:
    """A stdlib TLS client (anyio's TLSStream): handshake and one echo; its seconds."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    start = time.monotonic()
    with anyio.fail_after(TIMEOUT):
        stream = await anyio.connect_tcp("127.0.0.1", port, tls=True, ssl_context=ctx,
                                         tls_hostname="localhost")
        try:
            await stream.send(b"still serving")
            try:
                assert await stream.receive() == b"still serving"
            except anyio.BrokenResourceError:
                raise AssertionError(served and (served.handler_errors, served.handshake_errors,
                                                 served.loop_errors)) from None
        finally:
            await anyio.aclose_forcefully(stream)
    return time.monotonic() - start


async def wait_until(predicate: Callable[[], bool], what: str,
                     timeout: float = TIMEOUT) -> None:
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
    assert predicate(), f"timed out waiting until {what}"


def trio_too_slow() -> type[BaseException]:
    import trio

    return trio.TooSlowError


def check_reported_as_a_timeout(kind: str, served: Served, n: int,
                                caplog: pytest.LogCaptureFixture) -> None:
    """The face reported ``n`` handshake timeouts as its stdlib counterpart does."""
    if kind == "anyio":
        # anyio's TLSListener: TimeoutError to handle_handshake_error, whose
        # default logs "Error during TLS handshake" with the exception
        assert served.handshake_errors == [TimeoutError] * n, \
            served.handshake_errors
        logged = [r for r in caplog.records if r.getMessage() == "Error during TLS handshake"]
        assert len(logged) == n, caplog.records
        assert all(r.exc_info and r.exc_info[0] is TimeoutError for r in logged)
        caplog.clear()   # the records hold the tracebacks, and through them the streams
    elif kind == "trio":
        import trio

        assert served.handshake_errors == [trio.TooSlowError] * n, \
            served.handshake_errors
    else:
        # asyncio: a ConnectionAbortedError (an OSError), which asyncio's
        # sslproto does not pass to the loop's exception handler
        assert served.loop_errors == [], served.loop_errors


# == idle and half-ClientHello peers ========================================================
@pytest.mark.parametrize("impl", ["ours", "stdlib"])
@pytest.mark.parametrize(("kind", "anyio_backend"), KINDS, ids=KIND_IDS)
async def test_silent_and_half_hello_peers_are_closed_after_the_handshake_timeout(
        pki: Pki, offload: A.Offload, caplog: pytest.LogCaptureFixture, kind: str,
        impl: str) -> None:
    caplog.set_level(logging.ERROR)
    half_hello = client_hello()[:60]
    async with serving(kind, impl, pki, offload, echo_once) as served:
        await good_client(pki, served.port, served)   # warm-up: the loop's notifier fd exists now
        fds = await settled_fd_count()
        closed_after: dict[str, float] = {}

        async def idle_peer(name: str, first_bytes: bytes) -> None:
            sock = await raw_connect(served.port)
            start = time.monotonic()
            try:
                if first_bytes:
                    sock.send(first_bytes)
                with anyio.fail_after(TIMEOUT):
                    await wait_closed_by_peer(sock)
                closed_after[name] = time.monotonic() - start
            finally:
                sock.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(idle_peer, "silent", b"")
            tg.start_soon(idle_peer, "half hello", half_hello)
        for name, seconds in closed_after.items():
            assert HANDSHAKE_TIMEOUT * 0.8 <= seconds < HANDSHAKE_TIMEOUT + 10, (name, seconds)
        assert served.handled == 1, "the handler ran for a peer that never did a handshake"
        await wait_until(lambda: kind == "asyncio" or len(served.handshake_errors) == 2,
                         "both timeouts were reported")
        check_reported_as_a_timeout(kind, served, 2, caplog)
        await good_client(pki, served.port, served)
        assert served.handled == 2
        await wait_until(lambda: fd_count() <= fds, "the descriptors were closed", 10)


@pytest.mark.parametrize(("kind", "anyio_backend"), KINDS, ids=KIND_IDS)
async def test_200_idle_peers_neither_delay_a_good_client_nor_outlive_the_timeout(
        pki: Pki, offload: A.Offload, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    # no log records: they would keep the tracebacks, and through them the streams
    caplog.set_level(logging.CRITICAL + 1, logger="anyio_asyncssl.stream")
    timeout = 2.0
    peers = 200
    half_hello = client_hello()[:60]
    async with serving(kind, "ours", pki, offload, echo_once, timeout) as served:
        await good_client(pki, served.port, served)   # warm-up: the loop's notifier fd exists now
        fds = await settled_fd_count()
        live = A.connection_counters()["live"]
        socks = []
        try:
            start = time.monotonic()
            for i in range(peers):
                sock = await raw_connect(served.port)
                socks.append(sock)
                if i % 2:
                    sock.send(half_hello)
            # all 200 are accepted and held before the good client comes
            await wait_until(lambda: accept_queue(served.port) == 0, "the server accepted all")
            seconds = await good_client(pki, served.port, served)
            assert seconds < timeout, f"a good client waited {seconds:.2f} s behind idle peers"
            assert time.monotonic() - start < timeout and not served.handshake_errors, \
                "the idle peers were dropped before the good client was served"
            with anyio.fail_after(timeout + 20):
                async with anyio.create_task_group() as tg:
                    for sock in socks:
                        tg.start_soon(wait_closed_by_peer, sock)
            assert time.monotonic() - start >= timeout * 0.8
            # the server's ends are closed: only our 200 client sockets are left
            await wait_until(lambda: fd_count() <= fds + peers, "the server closed its ends", 10)
        finally:
            for sock in socks:
                sock.close()
        await wait_until(lambda: kind == "asyncio" or len(served.handshake_errors) == peers,
                         "every timeout was reported")
        assert served.handshake_errors == {"anyio": [TimeoutError] * peers,
                                           "trio": [trio_too_slow()] * peers,
                                           "asyncio": []}[kind]
        assert served.loop_errors == []
        assert served.handled == 2
        await wait_until(lambda: fd_count() <= fds, "the descriptors were closed", 10)

        def freed() -> bool:
            gc.collect()
            # (anyio's and trio's accept loops keep the last stream they accepted)
            return A.connection_counters()["live"] <= live + 1

        await wait_until(freed, "every connection was freed", 10)


# == slow readers and floods: bounded buffers ==================================================
@dataclass
class Stalled:
    """One side's figures once the flow stopped."""

    plaintext: int = 0       # what the sending application got accepted
    held: int = 0            # ciphertext held in the receiving or sending process
    rss_growth: int = 0      # peak RSS growth while it ran
    heap_growth: int = 0     # peak malloc'ed growth while it ran
    pauses: int = 0          # asyncio: the protocol's pause_writing calls
    max_write_buffer: int = 0   # asyncio: the largest get_write_buffer_size seen
    write_high: int = 0      # asyncio: the transport's high-water mark


@dataclass
class Progress:
    sent: int = 0            # bytes whose send() returned
    sending: int = 0         # bytes of the send() under way
    conn: Conn | None = None


async def wait_for_stall(progress: Callable[[], int], result: Stalled, rss0: int, heap0: int,
                         sample: Callable[[], None] = lambda: None) -> None:
    """Sample memory until ``progress()`` has not moved for 0.3 s (at most 5 s)."""
    last, since = -1, time.monotonic()
    deadline = since + 5
    while time.monotonic() < deadline:
        await anyio.sleep(0.02)
        result.rss_growth = max(result.rss_growth, rss() - rss0)
        result.heap_growth = max(result.heap_growth, heap_in_use() - heap0)
        sample()
        now = time.monotonic()
        if progress() != last:
            last, since = progress(), now
        elif now - since > 0.3:
            return


async def run_until_stalled(
        kind: str, impl: str, pki: Pki, offload: A.Offload, handler: Handler,
        progress: Progress, result: Stalled,
        client_role: Callable[[CountingClient], Coroutine[Any, Any, None]],
        moved: Callable[[CountingClient], int],
        measure: Callable[[CountingClient, Conn], None],
        sample: Callable[[], None] = lambda: None) -> None:
    """Serve ``handler``, run ``client_role`` until ``moved`` stops; then ``measure``.

    ``measure`` runs in one synchronous look: nothing moves meanwhile (one thread).
    """
    async with serving(kind, impl, pki, offload, handler) as served:
        gc.collect()
        rss0, heap0 = rss(), heap_in_use()
        client = await CountingClient.connect(pki, served.port)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client_role, client)
                await wait_until(lambda: progress.conn is not None, "the handler started")
                await wait_for_stall(lambda: moved(client), result, rss0, heap0, sample)
                assert progress.conn is not None
                measure(client, progress.conn)
                tg.cancel_scope.cancel()
        finally:
            client.close()


async def stall_a_sender(kind: str, impl: str, pki: Pki, offload: A.Offload,
                         bytes_per_ms: int, payload: bytes | None = None) -> Stalled:
    """The server sends to a client reading ``bytes_per_ms``; measure once it stalls.

    The server sends 64 KiB at a time, up to 64 MiB, or ``payload`` in one send.
    """
    progress = Progress()
    result = Stalled()

    async def sender(conn: Conn) -> None:
        progress.conn = conn
        chunk = b"s" * CHUNK
        while progress.sent < 64 * MIB:
            data = payload or chunk
            progress.sending = len(data)
            await conn.send(data)
            progress.sending = 0
            progress.sent += len(data)
            if payload:
                return

    def sample() -> None:
        conn = progress.conn
        if conn is not None and conn.transport is not None:
            result.max_write_buffer = max(result.max_write_buffer,
                                          conn.transport.get_write_buffer_size())

    def measure(client: CountingClient, conn: Conn) -> None:
        # What the application offered and the kernel and the client do not
        # have is held by the server (the part of the send under way that is
        # still in the caller's buffer included)
        result.plaintext = progress.sent
        result.held = (ciphertext_size(progress.sent + progress.sending)
                       - unsent(conn.fd) - unread(client.sock.fileno()) - client.pulled)
        if conn.protocol is not None:
            result.pauses = conn.protocol.pauses
            result.write_high = conn.transport.get_write_buffer_limits()[1]

    await run_until_stalled(
        kind, impl, pki, offload, sender, progress, result,
        lambda client: client.read_slowly(bytes_per_ms),
        lambda client: unread(client.sock.fileno()) + client.pulled, measure, sample)
    return result


# what one send may hold on our side at most: a 256 KiB write step's records
# (driver.write, the asyncio layer's chunk), plus one 64 KiB send of the handler
OUR_SEND_BOUND = 256 * KIB + CHUNK


@pytest.mark.parametrize("bytes_per_ms", [0, 1], ids=["reads-nothing", "reads-1-byte-per-ms"])
@pytest.mark.parametrize(("kind", "anyio_backend"), KINDS, ids=KIND_IDS)
async def test_a_slow_reader_makes_send_block_instead_of_buffering(
        pki: Pki, offload: A.Offload, kind: str, bytes_per_ms: int) -> None:
    ours = await stall_a_sender(kind, "ours", pki, offload, bytes_per_ms)
    stdlib = await stall_a_sender(kind, "stdlib", pki, offload, bytes_per_ms)
    assert ours.plaintext < 64 * MIB, "send() never blocked"
    if kind == "asyncio":
        # asyncio's contract: the transport buffers, the protocol is paused at
        # the high-water mark, and the buffer stops growing there
        assert ours.pauses >= 1, "pause_writing was never called"
        assert ours.max_write_buffer <= ours.write_high + CHUNK, ours
        bound = ours.write_high + OUR_SEND_BOUND + 64 * KIB    # + the raw transport's
    else:
        bound = OUR_SEND_BOUND
    assert ours.held <= bound, ours
    assert ours.held <= max(stdlib.held, 0) + OUR_SEND_BOUND, (ours, stdlib)
    assert ours.heap_growth <= bound + 8 * MIB, ours


@pytest.mark.parametrize(("kind", "anyio_backend"), KINDS, ids=KIND_IDS)
async def test_one_huge_send_to_a_reader_that_reads_nothing_is_not_encrypted_ahead(
        pki: Pki, offload: A.Offload, kind: str) -> None:
    """The stdlib's TLS encrypts a whole send() into its memory BIO; ours one step at a time."""
    payload = b"h" * (32 * MIB)
    ours = await stall_a_sender(kind, "ours", pki, offload, 0, payload)
    stdlib = await stall_a_sender(kind, "stdlib", pki, offload, 0, payload)
    if kind != "asyncio":   # asyncio's write() never blocks: the transport keeps the data
        assert ours.plaintext == 0, "the send completed although nobody read"
    assert stdlib.heap_growth >= 16 * MIB, stdlib   # it did buffer: the measure sees it
    assert ours.heap_growth <= 8 * MIB, (ours, stdlib)


async def flood_a_server_that_does_not_read(kind: str, impl: str, pki: Pki,
                                            offload: A.Offload) -> Stalled:
    """The client sends as fast as it can; the server's application never reads."""
    progress = Progress()
    result = Stalled()

    async def not_reading(conn: Conn) -> None:
        progress.conn = conn
        await anyio.sleep(TIMEOUT)

    def measure(client: CountingClient, conn: Conn) -> None:
        # what the client's kernel took and neither kernel still has was read
        # by the server's process
        result.plaintext = client.sent_plain
        result.held = client.pushed - unsent(client.sock.fileno()) - unread(conn.fd)

    await run_until_stalled(kind, impl, pki, offload, not_reading, progress, result,
                            lambda client: client.flood(64 * MIB),
                            lambda client: client.pushed, measure)
    return result


@pytest.mark.parametrize(("kind", "anyio_backend"), KINDS, ids=KIND_IDS)
async def test_a_flood_to_an_application_that_does_not_read_stops_our_reading(
        pki: Pki, offload: A.Offload, kind: str) -> None:
    ours = await flood_a_server_that_does_not_read(kind, "ours", pki, offload)
    stdlib = await flood_a_server_that_does_not_read(kind, "stdlib", pki, offload)
    assert ours.plaintext < 64 * MIB, "the flood was never held back"
    assert ours.held <= max(stdlib.held, 0) + 256 * KIB, (ours, stdlib)
    assert ours.heap_growth <= 8 * MIB, ours
