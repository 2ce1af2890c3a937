"""The driver: one retry loop that runs TLSConnection operations over a transport.

Theory of operation
-------------------
Every public operation of both faces (anyio and trio) goes through
:meth:`Driver._run`, which repeats one sans-IO step until it is done:

* ``WANT_READ``: receive ciphertext from the transport (under the receive
  lock) and retry;
* ``WANT_ASYNC``: an OpenSSL async job is paused inside the step.  From here
  until the job finishes, the task is inside a *shielded* cancel scope: it
  waits for the engine and retries the same step, because OpenSSL cannot
  cancel a job and the next SSL call on this connection would resume it
  whatever it is (rules 1 and 4 of docs/architecture.md).  How to wait depends on
  ``SSL_get_async_status`` (rule 7): OK -> the C callback's wake-up through
  the loop's notifier, for at most a bound that grows from 1 to 5 s (a
  lost wake-up costs a late retry, never a hang); EAGAIN -> retry after a short,
  growing sleep; ERR ->
  retry at once so the job can finish (it fails, AsyncEngineError);
  UNSUPPORTED -> wait on the engine's fds.  Wake-ups are level-style: the
  connection's wake-up counter is read before each step, so one that came
  early (even inside the step) is never lost, and a spurious one only costs
  a retry (rule 5).
* ``WANT_ASYNC_JOB``: the thread's job pool is empty: wait until another
  step finishes or does not pause; every such step wakes one waiter (rule 8).

After every step the ciphertext it produced is sent, in order, under the
send lock.  One task may send while another receives (full duplex): the SSL
calls themselves never await, so they cannot interleave, and WANT_READ ends
a job.  While a job is paused every other operation waits for that pause to
end, so the two directions never interleave inside a pause.

The driver also owns every protocol step and every piece of state both
faces share, so that a face only maps outcomes to its framework's
vocabulary: the stream's state (usable, broken with a reason, closed), one
busy detector per direction (:class:`StreamBusy`), ``send_eof`` (close_notify
once, then no more writes), ``unwrap``, holding a TLS 1.3 server's session
tickets until its first send (``hold_session_tickets``: OpenSSL writes them
as the handshake completes, and a server that insisted on sending them then
would wait for a client that may not read before it writes: a deadlock over
an unbuffered transport, as trio.SSLStream knows), and waiting until a send
may not block.  Failures keep only a description (``broken``): a stored
exception would hold its traceback's frames, and through them the stream.

Cancellation: a read that completed inside the shield keeps its plaintext
for the next read; ciphertext received but not yet stepped goes into the
read BIO before any wait; ciphertext not yet sent stays queued and goes out
with the next flush (at the latest before the next wait for the peer); a
send interrupted half way (between chunks, or inside the transport's send)
breaks the stream.  asyncio's native ``Task.cancel()`` passes through anyio's
shields: it is held back until the job has finished and what the job wrote
has been sent, then raised.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio

from .connection import AsyncStatus, Operation, Status, TLSConnection
from .dispatch import LoopDispatcher, current_dispatcher
from .errors import AsyncEngineError, TLSError
from .sockets import SocketIO

__all__ = ["Driver", "StreamBroken", "StreamBusy", "StreamClosed", "describe"]

_EAGAIN_FIRST = 0.0002
_EAGAIN_MAX = 0.02
_JOB_WAIT_MAX = 0.05
_WAKE_FIRST = 1.0
_WAKE_MAX = 5.0
_ERR_RETRIES = 100
_ALERT_TIMEOUT = 1.0


class StreamClosed(Exception):
    """The stream was closed (or unwrapped), or its sending side ended (send_eof)."""


class StreamBroken(Exception):
    """An earlier failure left the stream unusable; ``str()`` says which."""


class StreamBusy(Exception):
    """Another task is already sending (or receiving) on this stream."""


def describe(exc: BaseException | None) -> str | None:
    """``"Type: message"`` for an exception (what a broken stream keeps of it)."""
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ConflictDetector:
    """Raises ``busy_error(what)`` when a second task enters (trio's and anyio's rule)."""

    __slots__ = ("_busy_error", "_held", "_what")

    def __init__(self, what: str, busy_error: Callable[[str], Exception] = StreamBusy) -> None:
        self._what = what
        self._busy_error = busy_error
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise self._busy_error(self._what)
        self._held = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._held = False


class Driver:
    """Runs one TLSConnection over ``send(bytes)`` / ``receive() -> bytes`` (b"" = EOF).

    ``hold_session_tickets``: a TLS 1.3 server keeps the tickets its
    handshake wrote until its first send (see the module docstring).
    ``busy_error(direction)`` makes the exception :attr:`sending` and
    :attr:`receiving` raise for a second task ("sending"/"receiving"): the
    face's own ``BusyResourceError``.
    """

    def __init__(
        self,
        conn: TLSConnection,
        send: Callable[[bytes], Awaitable[None]],
        receive: Callable[[], Awaitable[bytes]],
        *,
        hold_session_tickets: bool = False,
        busy_error: Callable[[str], Exception] = StreamBusy,
        sock: SocketIO | None = None,
    ) -> None:
        self.conn = conn
        self._send = send
        self._receive = receive
        # the native path: OpenSSL does the socket I/O, we only wait on the fd
        self.sock = sock
        if sock is not None:
            conn.attach_socket(sock.fd, sock.prefix)
            sock.prefix = b""     # C has its copy (often a whole ClientHello)
            sock.on_close = conn.forget_socket
        self._hold_tickets = hold_session_tickets and conn.server_side
        self._held: bytes = b""   # session tickets not sent yet
        # the state both faces share
        self.broken: str | None = None   # why the stream is unusable
        self.closed = False
        self.closing = False             # aclose() is under way
        self.eof_sent = False
        self.sending = ConflictDetector("sending", busy_error)
        self.receiving = ConflictDetector("receiving", busy_error)
        self._handshake_started = False
        self._handshake_over = False
        # made only when a second task waits for the handshake (memory: most
        # streams never need it)
        self._handshake_finished: anyio.Event | None = None
        # uncontended, these take no checkpoint: the transport calls they
        # guard checkpoint anyway, and on trio a lock checkpoint per record
        # costs a scheduler round trip
        self._send_lock = _Lock()
        self._recv_lock = _Lock()
        self._pause_end: anyio.Event | _Over = _NO_PAUSE
        self._stash: list[bytes] = []
        # ciphertext taken from the connection, in step order, not yet sent
        self._outq: list[bytes] = []
        self._dispatcher: LoopDispatcher | None = None
        self._fds: set[int] = set()
        self.transport_eof = False
        self._receives = 0   # transport receives so far (see _receive_some)
        self.pauses = 0
        #: waits on the transport, the fd or the engine so far: an operation
        #: that did none never yielded to other tasks (the faces then do)
        self.io_events = 0

    # -- state -------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`StreamClosed` or :class:`StreamBroken` unless usable."""
        if self.closed:
            raise StreamClosed("the TLS stream was closed")
        if self.broken is not None:
            raise StreamBroken(self.broken)

    def mark_broken(self, exc: BaseException | None = None) -> None:
        """The stream is unusable from now on (the first reason is kept)."""
        if self.broken is None:
            self.broken = describe(exc) or "an operation was interrupted"

    def _failed(self, exc: BaseException) -> None:
        """An operation raised ``exc``: break the stream if nothing can work after it.

        TLS failed, or the transport did.  Or KeyboardInterrupt/SystemExit
        landed between OpenSSL's step and our bookkeeping (trio raises KI
        anywhere): what that step read or wrote is lost, so the stream is
        done, and closing it must not attempt a closing handshake.
        Cancellation only ever lands at an await, where nothing is lost.
        """
        if isinstance(exc, _breaking()):
            self.mark_broken(exc)
        elif isinstance(exc, GeneratorExit):
            pass    # a coroutine closed (perhaps with no loop left to ask)
        elif not isinstance(exc, Exception | anyio.get_cancelled_exc_class()):
            self.mark_broken(exc)

    # -- the loop --------------------------------------------------------------
    def _bind(self) -> LoopDispatcher:
        d = current_dispatcher()
        if self._dispatcher is not d:
            self._dispatcher = d
            self.conn.attach_notifier(d.notifier)
        return d

    async def _run(self, op: int, step: Callable[[bytes], Status]) -> Status:
        # an operation cancelled before it starts does nothing: on the native
        # path a step does its I/O at once, before any await could raise
        d = self._dispatcher or self._bind()
        await d.checkpoint_if_cancelled()
        try:
            return await self._retry(op, step)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def _retry(self, op: int, step: Callable[[bytes], Status]) -> Status:
        conn = self.conn
        sock = self.sock
        d = self._dispatcher or self._bind()
        incoming = b""
        while True:
            c = conn._native  # the C connection: its fields are read directly on this hot path
            pending = c.pending_op
            # (a pending job with _pause_end set has no task finishing it: the
            # step then raises OperationInProgressError instead of spinning)
            while pending and pending != op and not self._pause_end.is_set():
                if incoming:
                    # never hold received ciphertext across an await: a cancel
                    # here would drop it and break the record stream; the
                    # read BIO keeps it (a BIO write resumes no job)
                    conn.receive_bytes(incoming)
                    incoming = b""
                await self._pause_end.wait()
                c = conn._native
                pending = c.pending_op
            if sock is not None and not sock.alive:
                # the transport's socket was closed under us
                sock.close()
                raise anyio.ClosedResourceError("the transport's socket was closed")
            before = int(c.wakeups)
            seen = self._receives
            try:
                status = step(incoming)
                incoming = b""
                if status is Status.WANT_ASYNC:
                    status = await self._finish_job(step, before)
            except TLSError:
                d.release_job_waiter()  # this call finished: it no longer holds a job
                await self._send_alert()
                raise
            if d.job_waiters and status is not Status.WANT_ASYNC_JOB:
                d.release_job_waiter()
            if self._queue_output():
                await self._flush()
            if status is Status.DONE or status is Status.CLOSED:
                return status
            if status is Status.WANT_READ:
                if sock is not None:
                    self.io_events += 1
                    await sock.readable()
                    continue
                if self._outq and not self._send_lock.locked():
                    # a send cancelled before its flush left its ciphertext
                    # queued: send it before waiting for a peer who may be
                    # waiting for it (without waiting for the lock: see
                    # _queue_output)
                    await self._flush()
                incoming = await self._receive_some(seen)
            elif status is Status.WANT_WRITE and sock is not None:
                self.io_events += 1
                await sock.writable()
            elif status is Status.WANT_ASYNC_JOB:
                await d.wait_for_job(_JOB_WAIT_MAX)

    async def _finish_job(self, step: Callable[[bytes], Status], before: int) -> Status:
        """A job is paused: wait for the engine and retry until it has finished."""
        self.pauses += 1
        self._pause_end = pause_end = anyio.Event()
        status = Status.WANT_ASYNC
        eagain_delay = _EAGAIN_FIRST
        wake_bound = _WAKE_FIRST
        err_retries = 0
        deferred: BaseException | None = None
        cancelled_exc = anyio.get_cancelled_exc_class()
        try:
            with anyio.CancelScope(shield=True):
                while status is Status.WANT_ASYNC:
                    st = self.conn.async_status
                    try:
                        if st is AsyncStatus.OK:
                            await self._wait_callback(before, wake_bound)
                            wake_bound = min(wake_bound * 2, _WAKE_MAX)
                        elif st is AsyncStatus.EAGAIN:
                            await anyio.sleep(eagain_delay)
                            self.io_events += 1
                            eagain_delay = min(eagain_delay * 2, _EAGAIN_MAX)
                        elif st is AsyncStatus.ERR:
                            err_retries += 1
                            if err_retries > _ERR_RETRIES:
                                raise AsyncEngineError(
                                    "offload engine reported ASYNC_STATUS_ERR and its job never "
                                    "finished; the connection is abandoned (parked)")
                            await anyio.sleep(0 if err_retries < 10 else 0.001)
                            self.io_events += 1
                        else:
                            await self._wait_fds()
                            self.io_events += 1
                    except cancelled_exc as exc:
                        # only asyncio's native Task.cancel() (asyncio.wait_for,
                        # asyncio.timeout) gets through anyio's shield: finish the
                        # job first, then raise it (no task would finish it later)
                        deferred = exc
                    before = self.conn.wakeups
                    status = step(b"")
        finally:
            if self.conn.pending_operation is None:
                self._release_fds()
            pause_end.set()
        if deferred is not None:
            # what the finished job wrote goes out before the cancel is
            # raised: a receive of this stream may be waiting for the peer
            # already (it flushes only before it waits), and the peer for it
            if self._queue_output():
                with anyio.CancelScope(shield=True):
                    await self._flush()
            raise deferred
        return status

    async def _wait_callback(self, before: int, timeout: float) -> None:
        conn = self.conn
        d = self._dispatcher or self._bind()
        if await d.wait(conn.id, lambda: conn.wakeups != before, timeout):
            self.io_events += 1

    async def _wait_fds(self) -> None:
        added, removed = self.conn.changed_async_fds()
        self._fds.difference_update(removed)
        self._fds.update(added)
        if not self._fds:
            self._fds.update(self.conn.all_async_fds())
        if not self._fds:
            # an engine with neither callback nor fds: poll
            await anyio.sleep(0.001)
            return
        if len(self._fds) == 1:
            await anyio.wait_readable(next(iter(self._fds)))
            return
        async with anyio.create_task_group() as tg:
            async def one(fd: int) -> None:
                await anyio.wait_readable(fd)
                tg.cancel_scope.cancel()

            for fd in self._fds:
                tg.start_soon(one, fd)

    def _release_fds(self) -> None:
        for fd in self._fds:
            anyio.notify_closing(fd)
        self._fds.clear()

    # -- transport -------------------------------------------------------------
    def _queue_output(self) -> bool:
        """Move what the last step wrote to the send queue; whether it wrote anything.

        Called right after each step, with no await in between, and only a
        step that wrote something flushes.  So a receive whose step wrote
        nothing never waits for the send lock, nor sends another task's
        ciphertext: were it held up by a send stuck on a full transport, it
        would stop reading what the peer sends, and if the peer does the
        same, full duplex deadlocks.
        """
        data = self.conn.take_collected_output()
        if not data:
            return False
        self._outq.append(data)
        return True

    async def _flush(self) -> None:
        self.io_events += 1
        async with self._send_lock:
            # the queue is sent in order by whoever holds the lock; empty when
            # an earlier holder already took what we queued.  The holder also
            # sends what is queued meanwhile: its owner may be cancelled while
            # it waits for the lock, and nobody else would send it
            while self._outq:
                data = b"".join(self._outq)
                self._outq.clear()
                try:
                    await self._send(data)
                except BaseException as exc:
                    # the records are gone half way: the peer can no longer decrypt
                    self.mark_broken(exc)
                    raise

    async def _receive_some(self, seen: int) -> bytes:
        """Ciphertext from the transport for the next step (b"": nothing new to feed).

        ``seen``: :attr:`_receives` when the step that wants to read ran.  If
        another task received since (a read while a close waits for the
        peer's close_notify: it waited for the lock), the step is retried
        without receiving: that task's step has fed what it received to the
        connection, and it may be what this step waits for (the peer's
        close_notify); waiting on the transport for it would be for ever.
        The native path does the same in ``SocketIO``.
        """
        self.io_events += 1
        async with self._recv_lock:
            if self.transport_eof:
                self.conn.receive_eof()
                return b""
            if self._receives != seen:
                return b""
            data = await self._receive()
            # (the receiver's step feeds it before any other task runs)
            self._receives += 1
            if not data:
                self.transport_eof = True
                self.conn.receive_eof()
            return data

    async def _send_alert(self) -> None:
        """After a TLS error, send what OpenSSL queued: the fatal alert telling the peer why.

        RFC 8446 (5.2, 6.2) and RFC 5246 require it ("bad_record_mac",
        "decode_error", ...); without it the peer only sees the connection
        drop.  Best effort and bounded: a peer that is gone or not reading
        changes nothing, the caller gets the TLS error either way.
        """
        self._queue_output()
        if not self._outq or self.broken is not None:
            return
        with anyio.move_on_after(_ALERT_TIMEOUT):
            try:
                await self._flush()
            except Exception:
                pass

    # -- operations --------------------------------------------------------------
    async def handshake(self) -> None:
        """Run the handshake (the faces' eager path)."""
        self._handshake_started = True
        conn = self.conn

        def holding_tickets(incoming: bytes) -> Status:
            st = conn.do_handshake(incoming)
            if st is Status.DONE and conn.version() == "TLSv1.3":
                # what the last step wrote is the session tickets: keep them
                self._held = conn.take_collected_output()
            return st

        try:
            await self._run(Operation.HANDSHAKE,
                            holding_tickets if self._hold_tickets else conn.do_handshake)
        finally:
            if self._handshake_finished is not None:
                self._handshake_finished.set()
            self._handshake_over = True

    async def ensure_handshake(self) -> None:
        """Run the handshake once; concurrent callers wait for that one (a lazy handshake).

        A handshake that fails or is interrupted cannot be resumed: the stream
        is broken (as in trio).
        """
        if self.conn.handshake_done:
            return
        if self._handshake_started:
            if not self._handshake_over:
                if self._handshake_finished is None:
                    self._handshake_finished = anyio.Event()
                await self._handshake_finished.wait()
            self.check()
            return
        try:
            await self.handshake()
        except BaseException as exc:
            self.mark_broken(None if isinstance(exc, anyio.get_cancelled_exc_class()) else exc)
            raise

    async def read(self, max_bytes: int) -> bytes:
        """Plaintext, or b"" once the peer's close_notify arrived.

        Raises TLSEOFError on a transport EOF without close_notify.
        """
        if self._stash:
            data = self._stash.pop(0)
            if len(data) > max_bytes:
                self._stash.insert(0, data[max_bytes:])
                data = data[:max_bytes]
            return data
        conn = self.conn
        if self.sock is not None and not conn._native.async_mode and self._dispatcher:
            # the native path's common case, in one C call: records that have
            # arrived (no job can pause outside async mode, so no pause rules)
            await self._dispatcher.checkpoint_if_cancelled()
            try:
                if self.sock.alive:
                    st, data = conn.read(max_bytes)
                    if st is Status.DONE:
                        return data
                    if st is Status.CLOSED:
                        return b""
            except BaseException as exc:
                self._failed(exc)
                raise
            # nothing yet: the general loop waits and retries
        got: list[bytes] = []

        def step(incoming: bytes) -> Status:
            st, data = conn.read(max_bytes, incoming)
            if data:
                got.append(data)
            return st

        try:
            await self._run(Operation.READ, step)
        except BaseException:
            if got:  # completed inside the shield, then cancelled: keep it
                self._stash.append(got[0])
            raise
        return got[0] if got else b""

    def unread(self, data: bytes) -> None:
        """Give back what :meth:`read` returned: the next read returns it first."""
        self._stash.insert(0, data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Raises :class:`StreamClosed` after :meth:`send_eof`.  A write cancelled
        or failing between records breaks the stream (a prefix went out).
        """
        if self.eof_sent:
            raise StreamClosed("can't send data after sending EOF (send_eof)")
        if self._held:
            # the tickets go out in front of the first data this server sends
            self._outq.insert(0, self._held)
            self._held = b""
        view = memoryview(data).cast("B")
        total = len(view)
        conn = self.conn
        sent = 0
        pauses = self.pauses
        if (self.sock is not None and not conn._native.async_mode and self._dispatcher
                and not self._outq):
            # the native path's common case: the socket takes it all at once
            await self._dispatcher.checkpoint_if_cancelled()
            try:
                if self.sock.alive:
                    st, sent = conn.write(view)
                    if st is Status.DONE:
                        view = view[sent:]
                        if not len(view):
                            return
            except BaseException as exc:
                self._failed(exc)
                raise
            sent = 0
        try:
            while len(view):
                sent = 0

                def step(incoming: bytes, chunk: memoryview = view) -> Status:
                    nonlocal sent
                    st, sent = conn.write(chunk, incoming)
                    return st

                await self._run(Operation.WRITE, step)
                view = view[sent:]
        except BaseException as exc:
            if 0 < len(view) - sent < total:
                # cancelled (or failed) between chunks: a prefix of the data is
                # encrypted and will reach the peer, the rest never will
                self.mark_broken(exc)
            raise
        if self.pauses != pauses:
            # all of it is out (or queued): a cancellation that came while a
            # pause's shield held it back is raised now, after the fact, as a
            # socket stream's send raises one that came while it drained
            await self._dispatcher.checkpoint_if_cancelled()  # type: ignore[union-attr]

    async def send_close_notify(self) -> None:
        """Send our close_notify once (no waiting for the peer's)."""
        if self.conn.close_notify_sent:
            return

        def step(incoming: bytes) -> Status:
            return self.conn.shutdown(incoming)

        await self._run(Operation.SHUTDOWN, step)

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving until the peer's close_notify.

        Idempotent; writes afterwards raise :class:`StreamClosed`.  TLS 1.3
        makes this a real half-close (the peer may go on sending); TLS 1.2 (RFC
        5246 7.2.1) expects the peer to answer with its own close_notify at
        once, but OpenSSL still reads whatever it sends before that.
        """
        self.eof_sent = True
        await self.send_close_notify()

    async def _wait_close_notify(self) -> None:
        """After our close_notify: read until the peer's arrives (trailing data is kept)."""
        conn = self.conn

        def step(incoming: bytes) -> Status:
            st = conn.shutdown(incoming)
            if st is Status.DONE and not conn.close_notify_received:
                return Status.WANT_READ
            return st

        await self._run(Operation.SHUTDOWN, step)

    async def unwrap(self) -> bytes:
        """The TLS closing handshake; returns the bytes the peer sent after its close_notify.

        The stream is closed afterwards; those bytes were read from the
        transport already and are the start of what it carries next.
        """
        await self.send_close_notify()
        await self._wait_close_notify()
        trailing = self.conn.take_unread_input()
        self.closed = True
        self.release_socket()   # the transport is the caller's again
        return trailing

    async def wait_send_ready(self, wait: Callable[[], Awaitable[None]]) -> None:
        """Run the transport's ``wait`` (e.g. ``wait_send_all_might_not_block``) in send order."""
        async with self._send_lock:
            await wait()

    async def flush(self) -> None:
        """Send any queued ciphertext."""
        self._queue_output()
        if self._outq:
            await self._flush()

    def release_socket(self) -> None:
        """Close what the native path owns (our dup of an asyncio transport's fd)."""
        if self.sock is not None:
            self.sock.close()

    async def drain_pause(self) -> None:
        """Wait (shielded) until no job is paused on this connection."""
        with anyio.CancelScope(shield=True):
            # _pause_end set with a job still pending: nobody finishes it (its
            # engine failed for good); waiting would spin forever, and freeing
            # the connection parks it instead
            while self.conn.pending_operation is not None and not self._pause_end.is_set():
                await self._pause_end.wait()


_ANYIO_BREAKING: tuple[type[BaseException], ...] = (
    TLSError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class _Lock:
    """``anyio.Lock(fast_acquire=True)`` that allocates only when contended.

    Uncontended (nearly always), acquiring sets a flag: no checkpoint, no
    objects (a stream has two; anyio's Lock on trio is four objects each).
    A task that finds it held queues an Event and gets the lock handed over
    on release, in FIFO order; one cancelled after the hand-over passes it on.
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] | None = None

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        ev = anyio.Event()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(ev)
        try:
            await ev.wait()
        except BaseException:
            if ev.is_set():
                self._release()          # handed over already: pass it on
            else:
                self._waiters.remove(ev)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()    # the next owner: _held stays True
        else:
            self._held = False


class _Over:
    """The state before any pause: a set event nobody waits on (one per process)."""

    @staticmethod
    def is_set() -> bool:
        return True

    @staticmethod
    async def wait() -> None:
        return


_NO_PAUSE = _Over()


def _breaking() -> tuple[type[BaseException], ...]:
    """What breaks a stream: TLS or transport failures (trio's own ones once trio is loaded)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return _ANYIO_BREAKING
    return (*_ANYIO_BREAKING, trio.BrokenResourceError, trio.ClosedResourceError)
