"""Per-thread notifier: one eventfd and a completion queue for all connections.

Theory of operation
-------------------
The C async callback (conn.c) runs on an engine's worker thread, or inside a
job on the loop thread.  It must not take the GIL, so it only bumps the
connection's wake-up counter, appends the connection's id to this notifier's
completion queue (a mutex-protected array in C) and writes the eventfd.  An
event loop therefore watches a single fd however many connections it drives.

:meth:`Notifier.drain` empties the eventfd and returns the ids that
completed (``None`` after a queue overflow: then every waiter must re-check).
Wake-ups are level-style and may be early, duplicated or stale, so consumers
treat an id as "retry now", never as "the operation finished".

This module is loop-agnostic; the driver (stream.py) waits on :meth:`fileno`
with ``anyio.wait_readable`` and dispatches ids to waiting tasks.
"""

from __future__ import annotations

import threading
from typing import Any

from ._ffi import ffi, lib

__all__ = ["Notifier"]

_DRAIN_BATCH = 1024
_local = threading.local()


class Notifier:
    """An eventfd plus a completion queue of connection ids."""

    def __init__(self, capacity: int = 65536) -> None:
        self.ptr: Any = lib.asx_notifier_new(capacity)
        if self.ptr == ffi.NULL:
            raise OSError("could not create the notifier eventfd")
        self._ids = ffi.new("uint64_t[]", _DRAIN_BATCH)
        self.owner = threading.get_ident()

    @classmethod
    def for_current_thread(cls) -> Notifier:
        """The notifier of this OS thread (one per event loop thread)."""
        n: Notifier | None = getattr(_local, "notifier", None)
        if n is None:
            n = cls()
            _local.notifier = n
        return n

    def fileno(self) -> int:
        return int(lib.asx_notifier_fd(self.ptr))

    def drain(self) -> list[int] | None:
        """Completed connection ids since the last drain; ``None``: overflowed, wake all."""
        out: list[int] = []
        while True:
            n = lib.asx_notifier_drain(self.ptr, self._ids, _DRAIN_BATCH)
            if n < 0:
                return None
            out.extend(self._ids[0:n])
            if n < _DRAIN_BATCH:
                return out

    def post(self, conn_id: int) -> None:
        """Queue an id and signal, as the C callback does."""
        lib.asx_notifier_post(self.ptr, conn_id)

    def __del__(self) -> None:
        ptr = getattr(self, "ptr", None)
        if ptr is not None and ptr != ffi.NULL:
            lib.asx_notifier_free(ptr)
            self.ptr = None
