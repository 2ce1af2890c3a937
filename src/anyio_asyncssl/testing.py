"""The test engine: make any TLS operation pause, slow down or fail, at will.

Public, so users can test their own servers under offload:

* the offload provider's hooks pause the **handshake** (private-key
  operations), with configurable latency;
* a record-cipher provider (AES-128/256-GCM, ChaCha20-Poly1305 delegating to
  OpenSSL's default provider) pauses inside cipher update/final, so **read**,
  **write** and **shutdown** pause too.  It is loaded by name through
  :meth:`TLSContext.load_provider`, exactly as a vendor's provider would be;
* :class:`TestEngine.inject` injects EAGAIN (queue full), ERR (engine
  failure), a wake-up before the pause, a duplicate wake-up, fd-only
  notification, and wake-ups that come seconds late.

:func:`configure_trust` and :func:`configure_cert` do for a
:class:`TLSContext` what trustme's ``CA.configure_trust`` and
``LeafCert.configure_cert`` do for an ``ssl.SSLContext`` (trustme refuses
any other context type).

Also :func:`pump`, which drives two sans-IO connections against each other in
one thread (waiting for engine wake-ups), for tests that need no event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi, lib
from .connection import Status, TLSConnection
from .context import TLSContext
from .offload import Offload

__all__ = [
    "TEST_PROVIDER_NAME",
    "TestEngine",
    "cipher_counters",
    "configure_cert",
    "configure_trust",
    "pump",
    "pump_until",
    "retry_while_async",
]

TEST_PROVIDER_NAME = "asyncssl-test"


@dataclass
class CipherCounters:
    in_job: int
    paused: int


def cipher_counters() -> CipherCounters:
    """Record-cipher calls made inside a job, and how many of those paused."""
    a = ffi.new("uint64_t *")
    b = ffi.new("uint64_t *")
    lib.asx_cipher_counts(a, b)
    return CipherCounters(int(a[0]), int(b[0]))


class TestEngine:
    """Fault and latency injection for one :class:`Offload` (its worker pool).

    ``TestEngine(offload).enable_record_pauses(ctx)`` loads the record-cipher
    provider into ``ctx`` (under ``name``) and switches it to
    ``async_mode="always"``, so reads, writes and shutdowns pause as well.
    """

    __test__ = False  # not a pytest class

    def __init__(self, offload: Offload) -> None:
        self.offload = offload

    def enable_record_pauses(self, context: TLSContext, name: str = TEST_PROVIDER_NAME) -> None:
        if context.offload is not self.offload:
            raise ValueError("the context must use this engine's offload")
        self.offload.register_test_provider(name)
        context.load_provider(name, properties="?asyncssl.cipher=yes")
        context.async_mode = "always"

    @staticmethod
    def set_record_pauses(on: bool) -> None:
        """Turn the record-cipher pauses on or off (process-wide switch)."""
        lib.asx_set_cipher_pause(int(on))

    def set(
        self,
        *,
        latency_ms: float | None = None,
        late_ms: int | None = None,
        eagain: int | None = None,
        err: int | None = None,
        early: int | None = None,
        duplicate: int | None = None,
        fd_only: bool | None = None,
        max_queue: int | None = None,
        inline_latency_ms: float | None = None,
    ) -> None:
        """Set faults: counts apply to the next N offloaded operations; flags stay.

        ``latency_ms``: every operation takes this long on its worker.
        ``late_ms``: the completion (result and wake-up) comes this much later.
        ``eagain``/``err``: answer ASYNC_STATUS_EAGAIN / ERR.
        ``early``: fire the wake-up inside the job before it pauses.
        ``duplicate``: fire the completion wake-up twice.
        ``fd_only``: ignore the async callback, signal the wait fd
        (async status UNSUPPORTED), as an engine without callback support.
        ``max_queue``: a queue this long counts as full (real EAGAIN).
        ``inline_latency_ms``: an operation run inline (async mode off, no
        job) takes this long, on the caller's thread: a slow device used
        without offload.
        """
        faults: dict[str, int] = {}
        if latency_ms is not None:
            faults["latency_us"] = int(latency_ms * 1000)
        if late_ms is not None:
            faults["late_ms"] = late_ms
        if eagain is not None:
            faults["eagain_count"] = eagain
        if err is not None:
            faults["err_count"] = err
        if early is not None:
            faults["early_count"] = early
        if duplicate is not None:
            faults["duplicate_count"] = duplicate
        if fd_only is not None:
            faults["fd_only"] = int(fd_only)
        if max_queue is not None:
            faults["max_queue"] = max_queue
        if inline_latency_ms is not None:
            faults["inline_latency_us"] = int(inline_latency_ms * 1000)
        self.offload._set_faults(**faults)

    def faults(self) -> dict[str, int]:
        return self.offload._get_faults()

    def clear(self) -> None:
        """No faults, no latency."""
        self.offload._set_faults(latency_us=0, late_ms=0, eagain_count=0, err_count=0,
                                 early_count=0, duplicate_count=0, fd_only=0, max_queue=0,
                                 inline_latency_us=0)

    @contextlib.contextmanager
    def inject(self, **faults: int | float | bool) -> Iterator[TestEngine]:
        """``with engine.inject(err=1): ...`` sets faults for the block, then clears."""
        self.set(**faults)  # type: ignore[arg-type]
        try:
            yield self
        finally:
            self.clear()


# -- driving two sans-IO peers in one thread -----------------------------------
def _wait_engine(conn: TLSConnection, deadline: float) -> None:
    """Block briefly for the engine (tests only: a real driver never blocks)."""
    if time.monotonic() > deadline:
        raise TimeoutError("the engine never completed")
    time.sleep(0.0002)


def retry_while_async(call: Callable[[], Status], *, timeout: float = 10.0) -> list[Status]:
    """Call ``call`` (one operation) until it stops answering WANT_ASYNC; return every answer.

    Sleeps briefly between tries: for tests without an event loop only.
    """
    deadline = time.monotonic() + timeout
    seen = [call()]
    while seen[-1] is Status.WANT_ASYNC:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still WANT_ASYNC after {timeout} s")
        time.sleep(0.0002)
        seen.append(call())
    return seen


def pump_until(
    client: TLSConnection,
    server: TLSConnection,
    client_op: Callable[[bytes], Status],
    server_op: Callable[[bytes], Status],
    *,
    timeout: float = 10.0,
) -> tuple[Status, Status]:
    """Alternate two operations, shuttling bytes, until both answer DONE/CLOSED.

    WANT_ASYNC and WANT_ASYNC_JOB are retried (the same operation) after a
    short sleep; WANT_READ after the other side had a turn.
    """
    deadline = time.monotonic() + timeout
    cs: Status | None = None
    ss: Status | None = None
    finished = (Status.DONE, Status.CLOSED)
    while True:
        if cs not in finished:
            cs = client_op(server.bytes_to_send())
        else:
            client.receive_bytes(server.bytes_to_send())
        if ss not in finished:
            ss = server_op(client.bytes_to_send())
        else:
            server.receive_bytes(client.bytes_to_send())
        if cs in finished and ss in finished:
            # flush what the last steps wrote
            client.receive_bytes(server.bytes_to_send())
            server.receive_bytes(client.bytes_to_send())
            return cs, ss
        if Status.WANT_ASYNC in (cs, ss) or Status.WANT_ASYNC_JOB in (cs, ss):
            _wait_engine(client, deadline)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"no progress: client {cs!r}, server {ss!r}")


def pump(client: TLSConnection, server: TLSConnection, *, timeout: float = 10.0) -> None:
    """Complete the handshake between two connections in this thread."""
    pump_until(client, server, lambda b: client.do_handshake(b),
               lambda b: server.do_handshake(b), timeout=timeout)


def configure_trust(ca: Any, context: TLSContext) -> None:
    """Trust trustme's ``ca`` in ``context``, as ``ca.configure_trust(ctx)`` does for ssl.

    trustme's own method accepts only ``ssl.SSLContext`` (and pyOpenSSL);
    ``ca`` is a ``trustme.CA`` (anything with ``cert_pem.bytes()``).
    """
    context.load_verify_locations(cadata=ca.cert_pem.bytes().decode("ascii"))


def configure_cert(leaf: Any, context: TLSContext) -> None:
    """Present trustme's ``leaf`` certificate from ``context``, as ``leaf.configure_cert(ctx)``.

    ``leaf`` is a ``trustme.LeafCert``; its key and chain are loaded from a
    temporary PEM file (``load_cert_chain`` reads files, as the stdlib's).
    """
    with leaf.private_key_and_cert_chain_pem.tempfile() as path:
        context.load_cert_chain(path)
