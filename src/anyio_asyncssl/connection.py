"""TLSConnection: one SSL object over memory BIOs, sans I/O.

Theory of operation
-------------------
Bytes in, bytes out, no sockets and no event loop (h11's style).  Incoming
ciphertext goes into OpenSSL's read BIO (:meth:`receive_bytes`, or the
``incoming=`` argument of any operation, which saves a crossing); what OpenSSL
writes collects in :meth:`bytes_to_send`.  Every operation is one C call
(``asx_step``) that feeds, runs, classifies and drains, and answers a
:class:`Status`:

* ``DONE``: finished (with its result);
* ``WANT_READ``: feed more ciphertext and call again;
* ``WANT_ASYNC``: OpenSSL paused an async job inside the operation (an
  offload engine has the private key, or a record cipher).  Wait for the
  engine's wake-up (:attr:`async_status` says how: ``OK`` -> the async
  callback/notifier, ``EAGAIN`` -> retry a little later, ``ERR`` -> the
  engine failed, finish the job and fail, ``UNSUPPORTED`` -> poll
  :meth:`changed_async_fds`), then call the **same** operation again;
* ``WANT_ASYNC_JOB``: this thread's job pool is exhausted; call again once
  another connection's job finished;
* ``CLOSED``: the peer sent close_notify.

The rules of async mode (docs/architecture.md) are enforced here:

1. While a job is paused, any SSL call resumes *that* job, whatever the
   function.  So a different operation raises :class:`OperationInProgressError`
   instead of silently resuming the wrong one.
2. The job keeps the pointer of the first call's buffer.  Reads land in a
   pinned per-connection C buffer; writes are copied once into a pinned
   buffer and the retry must carry the same data.
3. A job resumes only on the thread that started it, and no thread may
   touch the SSL object while its owner is inside OpenSSL (cffi releases the
   GIL).  A connection belongs to the thread of its first use (a never-reused
   thread token, :mod:`~anyio_asyncssl.parking`); every method of another
   thread, ``free()`` included, gets :class:`WrongThreadError`.  A finaliser
   may run on any thread: nobody can be inside OpenSSL with a connection
   whose last reference is gone.
4. A connection with a paused job is never freed: when it is dropped it is
   parked; :func:`reap_parked` (called by the driver whenever wake-ups
   arrive) finishes such jobs on the owning thread and frees them.  What can
   never be finished is leaked on purpose and counted.

Every buffer handed to C is sized by its bytes (``ffi.from_buffer``'s
length, ``memoryview.nbytes``), never by ``len()``: a ``bytes`` subclass, an
``array('I')`` or a multi-byte memoryview answer ``len()`` with something
else, and OpenSSL would encrypt memory past the buffer or drop data.  And
no export (``ffi.from_buffer``'s cdata) outlives its C call: a frame that
raises while holding one puts it, with the exported memoryview, into the
exception's traceback, and when that becomes cyclic garbage CPython before
3.12.7 clears the memoryview with the export still held and crashes
(python/cpython#77894; a stream that records its failure makes that cycle).
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import os
import threading
from typing import Any

from . import parking, peercert
from ._ffi import ffi, lib
from .context import TLSContext, _idna_name, check_hostname_text, require_tls_context
from .errors import (
    AsyncEngineError,
    CertificateVerifyError,
    ConnectionFreedError,
    OperationInProgressError,
    TLSEOFError,
    TLSError,
    WrongThreadError,
    drain_queue,
    error_from_queue,
)
from .parking import connection_counters, current_thread_serial, reap_parked

__all__ = [
    "AsyncStatus",
    "Operation",
    "Status",
    "TLSConnection",
    "TLSSession",
    "connection_counters",
    "reap_parked",
    "set_job_pool",
]

READ_BUFFER_SIZE = 65536
WRITE_BUFFER_SIZE = 65536
OUT_BUFFER_SIZE = 4 * 65536


class Status(enum.IntEnum):
    """What an operation answered."""

    DONE = lib.ASX_DONE
    WANT_READ = lib.ASX_WANT_READ
    WANT_ASYNC = lib.ASX_WANT_ASYNC
    WANT_ASYNC_JOB = lib.ASX_WANT_ASYNC_JOB
    CLOSED = lib.ASX_CLOSED
    WANT_WRITE = lib.ASX_WANT_WRITE


class Operation(enum.IntEnum):
    HANDSHAKE = lib.ASX_OP_HANDSHAKE
    READ = lib.ASX_OP_READ
    WRITE = lib.ASX_OP_WRITE
    SHUTDOWN = lib.ASX_OP_SHUTDOWN


class AsyncStatus(enum.IntEnum):
    """``SSL_get_async_status`` after ``WANT_ASYNC`` (rule 7)."""

    UNSUPPORTED = lib.ASYNC_STATUS_UNSUPPORTED
    ERR = lib.ASYNC_STATUS_ERR
    OK = lib.ASYNC_STATUS_OK
    EAGAIN = lib.ASYNC_STATUS_EAGAIN


_STATUS = {int(s): s for s in Status}
# hot-path constants (attribute lookups on the cffi lib cost more than locals)
_asx_step = lib.asx_step
_NULL = ffi.NULL
_OP_READ = lib.ASX_OP_READ
_WANT_ASYNC = lib.ASX_WANT_ASYNC
_FAILURES = frozenset((lib.ASX_EOF, lib.ASX_ERROR, lib.ASX_TRANSPORT_ERROR))  # these raise
_OP_WRITE = lib.ASX_OP_WRITE
_OP_NONE = lib.ASX_OP_NONE
#: outside async mode a write goes to OpenSSL straight from the caller's
#: buffer, at most this much per step (bounds one step's time on the loop)
DIRECT_WRITE_MAX = 256 * 1024
_ASYNC_ERR = lib.ASYNC_STATUS_ERR
_ids = itertools.count(1)


class TLSSession:
    """A TLS session (ticket) to resume with, like :class:`ssl.SSLSession`."""

    def __init__(self, ptr: Any) -> None:
        self._ptr = ffi.gc(ptr, lib.SSL_SESSION_free)

    @property
    def id(self) -> bytes:
        n = ffi.new("unsigned int *")
        p = lib.SSL_SESSION_get_id(self._ptr, n)
        return bytes(ffi.buffer(p, n[0]))

    @property
    def time(self) -> int:
        return int(lib.SSL_SESSION_get_time(self._ptr))

    @property
    def timeout(self) -> int:
        return int(lib.SSL_SESSION_get_timeout(self._ptr))

    @property
    def has_ticket(self) -> bool:
        return bool(lib.SSL_SESSION_has_ticket(self._ptr))

    @property
    def ticket_lifetime_hint(self) -> int:
        return int(lib.SSL_SESSION_get_ticket_lifetime_hint(self._ptr))

    @property
    def is_resumable(self) -> bool:
        return bool(lib.SSL_SESSION_is_resumable(self._ptr))

    def __repr__(self) -> str:
        return f"<TLSSession id={self.id.hex()[:16]} resumable={self.is_resumable}>"


class _Handle:
    """Owns the asx_conn* and what its C side points into."""

    __slots__ = ("__weakref__", "conn", "keepalive", "owner", "parked", "result")

    def __init__(self, conn: Any, keepalive: list[Any]) -> None:
        self.conn = conn
        self.keepalive = keepalive
        self.owner: int | None = None   # the owning thread's serial (parking.py)
        self.parked = False
        self.result = ffi.new("asx_result *")

    def release(self) -> None:
        """Free now, or park when a job is paused (never SSL_free a paused job)."""
        c = self.conn
        if c is None or self.parked:
            # freed, or already parked (free() and then __del__ both release)
            return
        # asx_conn_free refuses while a job is paused (also asked of OpenSSL)
        if c.pending_op == lib.ASX_OP_NONE and lib.asx_conn_free(c):
            self.conn = None
            try:
                parking.count("freed")
            except TypeError:   # interpreter exit: parking's globals are gone
                pass
            return
        # Nobody does I/O for a dropped connection any more, and its transport
        # closes with it (or did already): the kernel may give its fd number
        # to another socket before the reaped job writes its record, which
        # would then go into that other connection.  Its socket is forgotten
        # first (steps fail with EBADF).  Safe on any thread: no step of a
        # dropped connection is under way, and workers never touch the BIO.
        lib.asx_conn_forget_socket(c)
        parking.park(self)


def set_job_pool(max_jobs: int, init_jobs: int = 0) -> None:
    """Cap this thread's OpenSSL async job pool (``ASYNC_init_thread``).

    ``max_jobs=0`` means no cap.  Refused (RuntimeError) while a job of this
    thread is paused: the old pool's dispatcher would go with it.
    """
    if parking.has_paused_jobs(current_thread_serial()):
        raise RuntimeError("cannot change the job pool while async jobs of this thread are paused")
    lib.ASYNC_cleanup_thread()
    if not lib.ASYNC_init_thread(max_jobs, init_jobs):
        raise TLSError("ASYNC_init_thread failed")


_thread_buffers = threading.local()


def _out_buffer() -> Any:
    """This thread's ciphertext drain buffer.

    asx_step copies the write BIO into it and Python copies it out right
    after, in the same thread: no OpenSSL job ever holds it, so one per
    thread serves every connection (instead of 256 KiB per connection).
    """
    buf = getattr(_thread_buffers, "out", None)
    if buf is None:
        buf = _thread_buffers.out = ffi.new("unsigned char[]", OUT_BUFFER_SIZE)
    return buf


def _drain_result() -> Any:
    """This thread's scratch asx_result for drains that must not clobber a step's result."""
    d = getattr(_thread_buffers, "drain", None)
    if d is None:
        d = _thread_buffers.drain = ffi.new("asx_result *")
    return d


def _shared_buffers() -> tuple[Any, Any]:
    """This thread's plaintext buffers for reads and writes outside async mode.

    A call outside async mode runs no job, so nothing can keep a pointer into
    these after the call returns; calls in async mode use pinned buffers of
    their own connection (asx_conn_pin, rule 2).
    """
    bufs: tuple[Any, Any] | None = getattr(_thread_buffers, "plain", None)
    if bufs is None:
        bufs = _thread_buffers.plain = (ffi.new("unsigned char[]", READ_BUFFER_SIZE),
                                        ffi.new("unsigned char[]", WRITE_BUFFER_SIZE))
    return bufs


class _Freed:
    """Stands in for the C connection after free(): any use is a clear error."""

    def __getattr__(self, name: str) -> Any:
        raise ConnectionFreedError("the TLS connection was freed")


_FREED: Any = _Freed()
_NO_INPUT = b""
_thread = parking.local  # the hot path reads its ``serial`` directly


class TLSConnection:
    """One TLS connection, sans I/O (the equivalent of :class:`ssl.SSLObject`).

    ``notify``: ``"callback"`` (default) installs the GIL-free C async
    callback, which counts wake-ups and posts to an attached
    :class:`~anyio_asyncssl.notifier.Notifier`; ``"fd"`` installs none, so
    engines signal their wait fds (:meth:`changed_async_fds`).
    """

    def __init__(
        self,
        context: TLSContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: TLSSession | None = None,
        notify: str = "callback",
        read_buffer_size: int = READ_BUFFER_SIZE,
        write_buffer_size: int = WRITE_BUFFER_SIZE,
    ) -> None:
        context = require_tls_context(context)
        if notify not in ("callback", "fd"):
            raise ValueError("notify must be 'callback' or 'fd'")
        if server_side and server_hostname:
            raise ValueError("server_hostname can only be given on the client side")
        if not server_side and context.check_hostname and not server_hostname:
            raise ValueError("check_hostname requires server_hostname")
        if server_hostname is not None:
            check_hostname_text(server_hostname)
        self.context = context
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.id = next(_ids)
        lib.ERR_clear_error()
        conn = lib.asx_conn_new(context.ssl_ctx, int(server_side), read_buffer_size,
                                write_buffer_size, int(notify == "callback"), self.id)
        if conn == ffi.NULL:
            raise error_from_queue("could not create the TLS connection")
        self._native = conn
        self._handle = _Handle(conn, [context, context._handle])
        parking.count("created")
        self._outgoing: list[bytes] = []
        self._async_status = AsyncStatus.UNSUPPORTED
        self._engine_failed = False
        self._handshake_done = False
        self._pinned = False
        self._native_socket = False
        self._notifier: Any = None
        self.async_mode = context.async_mode
        ssl_ = conn.ssl
        if server_hostname and not server_side:
            ascii_name = _idna_name(server_hostname.rstrip("."))
            self.server_hostname = ascii_name
            try:
                ipaddress.ip_address(ascii_name.strip("[]"))
                is_ip = True
            except ValueError:
                is_ip = False
            if not is_ip and not lib.SSL_set_tlsext_host_name(ssl_, ascii_name.encode()):
                raise error_from_queue("bad server_hostname")
            if context.check_hostname:
                if is_ip:
                    param = lib.SSL_get0_param(ssl_)
                    ok = lib.X509_VERIFY_PARAM_set1_ip_asc(param, ascii_name.strip("[]").encode())
                else:
                    lib.SSL_set_hostflags(ssl_, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
                    ok = lib.SSL_set1_host(ssl_, ascii_name.encode())
                if not ok:
                    raise error_from_queue("bad server_hostname")
        if session is not None:
            if server_side:
                raise ValueError("session is for the client side")
            if not lib.SSL_set_session(ssl_, session._ptr):
                raise error_from_queue("could not set session")
        if self.async_mode != "off":
            lib.asx_conn_set_async(conn, 1)

    # -- lifetime ---------------------------------------------------------------
    def free(self) -> None:
        """Release the SSL object now (parked instead while a job is paused).

        Afterwards every method raises :class:`ConnectionFreedError`; dropping
        the last reference frees it too.  Idempotent.  Raises
        :class:`WrongThreadError` on a thread that does not own the connection
        (its owner may be inside OpenSSL with it right now).
        """
        if self._native is _FREED:
            return
        self._owned()
        self._handle.release()
        self._native = _FREED

    def __del__(self) -> None:
        # any thread: the last reference is gone, so no thread is inside
        # OpenSSL with this connection (a step holds a reference)
        h = getattr(self, "_handle", None)
        if h is not None:
            h.release()

    def _owned(self) -> Any:
        """The C connection, for its owner thread only (binding it on first use).

        Raises :class:`ConnectionFreedError` after :meth:`free` and
        :class:`WrongThreadError` on any other thread than the owner.
        """
        c = self._native
        if c is _FREED:
            raise ConnectionFreedError("the TLS connection was freed")
        try:
            me = _thread.serial
        except AttributeError:
            me = current_thread_serial()
        if self._handle.owner != me:
            self._claim(me)
        return c

    def _claim(self, me: int) -> None:
        h = self._handle
        if h.owner is None:
            h.owner = me
            return
        gone = "" if parking.thread_alive(h.owner) else " (which has exited)"
        raise WrongThreadError(
            f"this TLS connection belongs to another thread{gone}: async jobs resume only "
            "on the thread that started them, and OpenSSL objects are not shared between "
            "threads")

    def attach_socket(self, fd: int, prefix: Any = b"") -> None:
        """Let OpenSSL read and write the non-blocking socket ``fd`` itself (native path).

        ``prefix``: bytes the transport had already read from it.  Before the
        first operation only; afterwards operations may also answer
        ``WANT_WRITE`` (wait until ``fd`` is writable) and raise ``OSError``
        when the socket fails.  :meth:`receive_bytes` and :meth:`bytes_to_send`
        have nothing to do; the caller keeps ``fd`` open while the connection
        lives.
        """
        c = self._owned()
        if self._handshake_done or c.pending_op or self._native_socket:
            raise ValueError("attach_socket() must come before the first operation")
        cbuf = ffi.from_buffer(prefix)   # its len() is the size in bytes
        lib.ERR_clear_error()
        ok = lib.asx_conn_use_socket(c, fd, cbuf, len(cbuf))   # (it copies the prefix)
        del cbuf   # no buffer export may outlive the call (see "Every buffer" above)
        if not ok:
            raise error_from_queue("could not attach the socket")
        self._native_socket = True

    def forget_socket(self) -> None:
        """The socket's fd is being closed: later operations fail (EBADF), never reuse it."""
        if self._native is not _FREED:
            lib.asx_conn_forget_socket(self._native)

    def attach_notifier(self, notifier: Any) -> None:
        """Post this connection's wake-ups to ``notifier`` (a :class:`Notifier`)."""
        c = self._owned()
        self._notifier = notifier
        self._handle.keepalive.append(notifier)
        lib.asx_conn_set_notifier(c, notifier.ptr)

    # -- the step -------------------------------------------------------------
    def _step(self, op: int, incoming: Any, arg: int) -> Status:
        """One asx_step call: feed, run ``op``, classify, drain (the hot path)."""
        c = self._native
        h = self._handle
        try:
            me = _thread.serial
        except AttributeError:
            me = current_thread_serial()
        if h.owner != me:
            c = self._owned()
        pending = c.pending_op
        if pending and pending != op:
            raise OperationInProgressError(
                f"{Operation(op).name.lower()} refused: the {Operation(pending).name.lower()}'s "
                "async job is paused; retry that operation first")
        r = h.result
        out = _out_buffer()
        if incoming is _NO_INPUT:
            _asx_step(c, op, _NULL, 0, arg, out, OUT_BUFFER_SIZE, r)
        else:
            cbuf = ffi.from_buffer(incoming)   # its len() is the size in bytes
            _asx_step(c, op, cbuf, len(cbuf), arg, out, OUT_BUFFER_SIZE, r)
            del cbuf   # before anything can raise: no export outlives the call
        if r.out_len:
            self._outgoing.append(ffi.buffer(out, r.out_len)[:])
            if r.out_pending:
                # more than one buffer of output: drain the rest into a
                # scratch result (asx_step zeroes the one it is given, and
                # this step's status and byte count are still to be read)
                d = _drain_result()
                d.out_pending = r.out_pending
                while d.out_pending:
                    _asx_step(c, 0, _NULL, 0, 0, out, OUT_BUFFER_SIZE, d)
                    self._outgoing.append(ffi.buffer(out, d.out_len)[:])
        status: int = r.status
        if status == _WANT_ASYNC:
            self._async_status = AsyncStatus(r.async_status)
            if r.async_status == _ASYNC_ERR:
                self._engine_failed = True
            if not pending:
                parking.mark_paused(me, h)
        elif pending:
            parking.mark_resumed(me, h)
        if status in _FAILURES:
            self._raise_error(op, status)
        return _STATUS[status]

    def _raise_error(self, op: int, status: int) -> None:
        if status == lib.ASX_TRANSPORT_ERROR:
            # the socket failed (native path): the transport's error, as a
            # socket stream would raise it
            errno = int(self._handle.result.sys_errno)
            drain_queue()
            raise OSError(errno, os.strerror(errno))
        last = lib.ERR_peek_last_error()
        is_ssl = last and lib.ERR_GET_LIB(last) == lib.ERR_LIB_SSL
        reason = lib.ERR_GET_REASON(last) if is_ssl else 0
        if status == lib.ASX_EOF or reason == lib.SSL_R_UNEXPECTED_EOF_WHILE_READING:
            raise error_from_queue(
                cls=TLSEOFError, message="EOF occurred in violation of protocol (no close_notify)",
                library="SSL", reason="UNEXPECTED_EOF_WHILE_READING")
        if reason == lib.SSL_R_CERTIFICATE_VERIFY_FAILED:
            code = int(lib.SSL_get_verify_result(self._native.ssl))
            vmsg = ffi.string(lib.X509_verify_cert_error_string(code)).decode()
            # like the stdlib: name what the certificate did not match
            if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                vmsg = f"Hostname mismatch, certificate is not valid for {self.server_hostname!r}."
            elif code == 64:  # X509_V_ERR_IP_ADDRESS_MISMATCH
                vmsg = ("IP address mismatch, certificate is not valid for "
                        f"{self.server_hostname!r}.")
            raise error_from_queue(
                cls=CertificateVerifyError, message=f"certificate verify failed: {vmsg}",
                library="SSL", reason="CERTIFICATE_VERIFY_FAILED",
                verify_code=code, verify_message=vmsg)
        if self._engine_failed:
            raise error_from_queue("offload engine failed", AsyncEngineError)
        raise error_from_queue(f"TLS {Operation(op).name.lower()} failed")

    def _buffers_for_new_call(self) -> None:
        """Point the connection at the buffers a new read or write may use."""
        c = self._native
        if self._pinned:
            return
        if c.async_mode:
            # this call may pause: its job will keep the buffer's address
            if not lib.asx_conn_pin(c):
                raise MemoryError("no memory for the connection's pinned buffers")
            self._pinned = True
        elif c.read_buf == ffi.NULL:
            rbuf, wbuf = _shared_buffers()
            lib.asx_conn_use_buffers(c, rbuf, READ_BUFFER_SIZE, wbuf, WRITE_BUFFER_SIZE)

    # -- operations -----------------------------------------------------------
    def do_handshake(self, incoming: Any = _NO_INPUT) -> Status:
        """Run (or continue) the handshake.  Raises TLSError subclasses on failure."""
        st = self._step(lib.ASX_OP_HANDSHAKE, incoming, 0)
        if st is Status.DONE and not self._handshake_done:
            self._handshake_done = True
            if self.async_mode == "handshake":
                # only private-key operations are offloaded: later calls need no job
                lib.asx_conn_set_async(self._native, 0)
        return st

    def read(self, max_bytes: int = READ_BUFFER_SIZE,
             incoming: Any = _NO_INPUT) -> tuple[Status, bytes]:
        """Decrypt up to ``max_bytes``: ``(DONE, data)``, ``(CLOSED, b"")``, or a want.

        ``read(0)`` is ``(DONE, b"")`` without touching OpenSSL, as the
        stdlib's ``SSLObject.read(0)``.  Raises ``ValueError`` for a negative
        size and :class:`TLSEOFError` on a transport EOF without close_notify.
        """
        if max_bytes <= 0:
            if max_bytes < 0:
                raise ValueError("size should not be negative")
            if incoming is not _NO_INPUT:
                self.receive_bytes(incoming)
            return Status.DONE, b""
        c = self._native
        if not c.pending_op and not self._pinned and (c.async_mode or c.read_buf == _NULL):
            self._owned()
            self._buffers_for_new_call()
        st = self._step(_OP_READ, incoming, max_bytes)
        if st is Status.DONE:
            return st, ffi.buffer(c.read_buf, self._handle.result.result)[:]
        return st, b""

    def write(self, data: Any, incoming: Any = _NO_INPUT) -> tuple[Status, int]:
        """Encrypt a prefix of ``data`` (at most the pinned buffer's size).

        ``data`` is any C-contiguous buffer; its bytes are what is sent.
        Returns ``(DONE, n)`` with the bytes consumed, or ``(want, 0)``.  After
        ``WANT_ASYNC`` call again with the same data: the paused job keeps the
        first call's buffer, and other data raises OperationInProgressError.
        """
        c = self._owned()  # before touching the pinned buffer: the owner may be inside SSL_write
        view = memoryview(data).cast("B")   # TypeError for non-contiguous buffers
        if not c.async_mode and c.pending_op == _OP_NONE:
            # no job can pause: OpenSSL reads the caller's bytes in place and
            # keeps nothing of them once the call returns
            if view.nbytes > DIRECT_WRITE_MAX:
                view = view[:DIRECT_WRITE_MAX]
            cbuf = ffi.from_buffer(view)   # its len() is the size in bytes
            if not len(cbuf):
                return Status.DONE, 0
            c.write_buf = ffi.cast("unsigned char *", cbuf)
            c.write_len = len(cbuf)
            try:
                st = self._step(_OP_WRITE, incoming, 0)
            finally:
                c.write_buf = _NULL
                del cbuf   # an exception's traceback must not keep the export
            return self._written(st)
        if c.pending_op == lib.ASX_OP_WRITE:
            n = c.write_len
            if bytes(view[:n]) != ffi.buffer(c.write_buf, n)[:]:
                raise OperationInProgressError(
                    "write retried with different data while its async job is paused")
        elif c.pending_op == lib.ASX_OP_NONE:
            if not self._pinned and (c.async_mode or c.write_buf == _NULL):
                self._buffers_for_new_call()
            n = min(view.nbytes, c.write_cap)
            if n == 0:
                return Status.DONE, 0
            ffi.memmove(c.write_buf, view[:n], n)
            c.write_len = n
        return self._written(self._step(lib.ASX_OP_WRITE, incoming, 0))

    def _written(self, st: Status) -> tuple[Status, int]:
        """A write step's answer: ``(status, bytes consumed)``.

        A write never answers CLOSED: SSL_get_error() says ZERO_RETURN for a
        failed SSL_write that queued no error once the peer's close_notify
        has come (an engine failing the record's cipher), and taken for
        "nothing written yet" the write was retried for ever.
        """
        if st is Status.CLOSED:
            self._raise_error(_OP_WRITE, lib.ASX_ERROR)
        return st, (int(self._handle.result.result) if st is Status.DONE else 0)

    def shutdown(self, incoming: Any = _NO_INPUT) -> Status:
        """Send close_notify (DONE once sent; see :attr:`close_notify_received`)."""
        if not self._handshake_done:
            raise error_from_queue(message="shutdown while in init: the handshake has not "
                                   "completed", library="SSL", reason="SHUTDOWN_WHILE_IN_INIT")
        return self._step(lib.ASX_OP_SHUTDOWN, incoming, 0)

    def key_update(self, request_peer_update: bool = True) -> None:
        """Schedule a TLS 1.3 KeyUpdate (RFC 8446 4.6.3) with the next write.

        Our sending keys change once the message is sent (with the next
        :meth:`write`, or now with ``do_handshake()``); with
        ``request_peer_update`` the peer must update its keys in turn.
        Raises :class:`TLSError` before the handshake has finished or on TLS 1.2,
        and :class:`OperationInProgressError` while an operation's job is paused
        (libssl would put the connection back in init under the job: a paused
        shutdown could then never be resumed, nor its connection freed).
        """
        c = self._owned()
        if c.pending_op:
            raise OperationInProgressError(
                f"key update refused: the {Operation(c.pending_op).name.lower()}'s async job "
                "is paused; retry that operation first")
        lib.ERR_clear_error()
        kind = (lib.SSL_KEY_UPDATE_REQUESTED if request_peer_update
                else lib.SSL_KEY_UPDATE_NOT_REQUESTED)
        if not lib.SSL_key_update(c.ssl, kind):
            raise error_from_queue("key update refused")

    # -- bytes in and out -----------------------------------------------------
    def receive_bytes(self, data: Any) -> None:
        """Feed ciphertext from the transport (any C-contiguous buffer)."""
        c = self._owned()
        cbuf = ffi.from_buffer(data)   # its len() is the size in bytes
        if len(cbuf):
            lib.asx_step(c, 0, cbuf, len(cbuf), 0, ffi.NULL, 0, self._handle.result)

    def receive_eof(self) -> None:
        """The transport ended: once the read BIO is empty, reads see EOF."""
        lib.asx_conn_set_eof(self._owned())

    def bytes_to_send(self) -> bytes:
        """Everything OpenSSL wrote since the last call (ciphertext for the transport)."""
        c = self._owned()
        r = self._handle.result
        out = _out_buffer()
        lib.asx_step(c, 0, ffi.NULL, 0, 0, out, OUT_BUFFER_SIZE, r)
        if r.out_len:
            self._outgoing.append(ffi.buffer(out, r.out_len)[:])
        out = self._outgoing
        if not out:
            return b""
        self._outgoing = []
        return out[0] if len(out) == 1 else b"".join(out)

    def has_bytes_to_send(self) -> bool:
        return bool(self._outgoing)

    def take_collected_output(self) -> bytes:
        """Ciphertext the operations already took from OpenSSL (each step drains it): no C call.

        :meth:`bytes_to_send` is the same plus a C call that drains OpenSSL.
        """
        out = self._outgoing
        if not out:
            return b""
        self._outgoing = []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_unread_input(self) -> bytes:
        """Ciphertext received but not consumed by OpenSSL (after unwrap: trailing data)."""
        c = self._owned()
        chunks: list[bytes] = []
        while True:
            out = _out_buffer()
            n = lib.asx_conn_take_input(c, out, OUT_BUFFER_SIZE)
            if n == 0:
                return b"".join(chunks)
            chunks.append(ffi.buffer(out, n)[:])

    # -- async state ----------------------------------------------------------
    @property
    def pending_operation(self) -> Operation | None:
        op = self._native.pending_op
        return Operation(op) if op else None

    @property
    def async_status(self) -> AsyncStatus:
        """``SSL_get_async_status`` as read after the last ``WANT_ASYNC``."""
        return self._async_status

    @property
    def async_active(self) -> bool:
        """Whether SSL calls currently run in OpenSSL async jobs (SSL_MODE_ASYNC)."""
        return bool(self._native.async_mode)

    @property
    def wakeups(self) -> int:
        """How often the async callback fired for this connection."""
        return int(self._native.wakeups)

    def changed_async_fds(self) -> tuple[list[int], list[int]]:
        """Engine wait fds added and removed since the last pause (never read or close them)."""
        ssl_ = self._owned().ssl
        na = ffi.new("size_t *")
        nd = ffi.new("size_t *")
        if not lib.SSL_get_changed_async_fds(ssl_, ffi.NULL, na, ffi.NULL, nd):
            return [], []
        add = ffi.new("int[]", max(na[0], 1))
        dele = ffi.new("int[]", max(nd[0], 1))
        lib.SSL_get_changed_async_fds(ssl_, add, na, dele, nd)
        return [add[i] for i in range(na[0])], [dele[i] for i in range(nd[0])]

    def all_async_fds(self) -> list[int]:
        ssl_ = self._owned().ssl
        n = ffi.new("size_t *")
        if not lib.SSL_get_all_async_fds(ssl_, ffi.NULL, n) or n[0] == 0:
            return []
        fds = ffi.new("int[]", n[0])
        lib.SSL_get_all_async_fds(ssl_, fds, n)
        return [fds[i] for i in range(n[0])]

    def stats(self) -> dict[str, int]:
        """Per-connection counters of the async machinery."""
        c = self._native
        return {
            "wakeups": int(c.wakeups),
            "callbacks_on_worker": int(c.cb_on_worker),
            "callbacks_in_job": int(c.cb_in_job),
            "want_async": int(c.want_async),
            "want_async_job": int(c.want_async_job),
            "retries": int(c.retries),
        }

    # -- inspection (ssl.SSLObject style) ---------------------------------------
    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def close_notify_received(self) -> bool:
        return bool(lib.SSL_get_shutdown(self._owned().ssl) & 2)  # SSL_RECEIVED_SHUTDOWN

    @property
    def close_notify_sent(self) -> bool:
        return bool(lib.SSL_get_shutdown(self._owned().ssl) & 1)  # SSL_SENT_SHUTDOWN

    def version(self) -> str | None:
        if not self._handshake_done:
            return None
        return str(ffi.string(lib.SSL_get_version(self._owned().ssl)).decode())

    def cipher(self) -> tuple[str, str, int] | None:
        c = lib.SSL_get_current_cipher(self._owned().ssl)
        if c == ffi.NULL:
            return None
        return (ffi.string(lib.SSL_CIPHER_get_name(c)).decode(),
                ffi.string(lib.SSL_CIPHER_get_version(c)).decode(),
                int(lib.SSL_CIPHER_get_bits(c, ffi.NULL)))

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        """Ciphers both sides offered (server side, after the handshake)."""
        out = ffi.new("const SSL_CIPHER *[]", 256)
        n = lib.asx_shared_ciphers(self._owned().ssl, out, 256)
        if n < 0 or not self.server_side:
            return None
        return [(ffi.string(lib.SSL_CIPHER_get_name(out[i])).decode(),
                 ffi.string(lib.SSL_CIPHER_get_version(out[i])).decode(),
                 int(lib.SSL_CIPHER_get_bits(out[i], ffi.NULL))) for i in range(n)]

    def selected_alpn_protocol(self) -> str | None:
        data = ffi.new("const unsigned char **")
        n = ffi.new("unsigned int *")
        lib.SSL_get0_alpn_selected(self._owned().ssl, data, n)
        if n[0] == 0:
            return None
        return bytes(ffi.buffer(data[0], n[0])).decode("ascii", "replace")

    def get_verified_chain(self, binary_form: bool = True) -> list[Any]:
        """The peer's chain as verified, leaf first (``[]`` unverified).

        DER bytes, as ``SSLSocket.get_verified_chain()`` (Python 3.13), or
        with ``binary_form=False`` the dicts :meth:`getpeercert` gives.
        """
        return self._chain(1, binary_form)

    def get_unverified_chain(self, binary_form: bool = True) -> list[Any]:
        """The peer's chain as it sent it (a server's view lacks the client's leaf)."""
        return self._chain(0, binary_form)

    def _chain(self, verified: int, binary_form: bool) -> list[Any]:
        if not self._handshake_done:
            raise ValueError("handshake not done yet")
        ssl_ = self._owned().ssl
        out: list[Any] = []
        while (x := lib.asx_chain_cert(ssl_, verified, len(out))) != ffi.NULL:
            out.append(peercert.der(x) if binary_form else peercert.decode(x))
        return out

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate: DER bytes, or the stdlib's dict (``{}`` if unverified)."""
        if not self._handshake_done:
            raise ValueError("handshake not done yet")
        x = lib.SSL_get1_peer_certificate(self._owned().ssl)
        if x == ffi.NULL:
            return None
        try:
            if binary_form:
                return peercert.der(x)
            if not (lib.SSL_CTX_get_verify_mode(lib.SSL_get_SSL_CTX(self._owned().ssl))
                    & lib.SSL_VERIFY_PEER):
                return {}
            return peercert.decode(x)
        finally:
            lib.X509_free(x)

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        if cb_type != "tls-unique":
            raise ValueError(f"{cb_type!r} channel binding type not implemented")
        buf = ffi.new("unsigned char[]", 128)
        ssl_ = self._owned().ssl
        if bool(lib.SSL_session_reused(ssl_)) ^ (not self.server_side):
            n = lib.SSL_get_finished(ssl_, buf, 128)
        else:
            n = lib.SSL_get_peer_finished(ssl_, buf, 128)
        return bytes(ffi.buffer(buf, n)) if n else None

    @property
    def session_reused(self) -> bool:
        return bool(lib.SSL_session_reused(self._owned().ssl))

    @property
    def session(self) -> TLSSession | None:
        """The current session, to pass as ``session=`` to a later connection."""
        s = lib.SSL_get1_session(self._owned().ssl)
        return TLSSession(s) if s != ffi.NULL else None

    def __repr__(self) -> str:
        side = "server" if self.server_side else "client"
        try:
            state = self.version() or "handshaking"
        except TLSError as exc:   # freed, or asked on another thread
            state = type(exc).__name__
        return f"<TLSConnection #{self.id} {side} {state}>"
