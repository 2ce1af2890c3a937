"""Notifier: one eventfd and a completion queue for all connections of a loop.

Theory of operation
-------------------
The C async callback (notifier.c) runs on an engine's worker thread, or inside a
job on the loop thread.  It must not take the GIL, so it only bumps the
connection's wake-up counter, appends the connection's id to the notifier's
completion queue (a mutex-protected array in C) and writes the eventfd.  An
event loop therefore watches a single fd however many connections it drives.

:meth:`Notifier.drain` empties the eventfd and returns the ids that
completed (``None`` after a queue overflow: then every waiter must re-check).
Wake-ups are level-style and may be early, duplicated or stale, so consumers
treat an id as "retry now", never as "the operation finished".

There is one notifier per event loop, not per thread: two loops in one
thread (trio in guest mode on asyncio) each drain their own, so neither can
swallow the other's wake-ups.  After ``fork()`` the child never drains,
closes or frees a notifier it inherited: the eventfd is the parent's too.

This module imports no event-loop library; :mod:`anyio_asyncssl.dispatch`
waits on :meth:`Notifier.fileno` inside each loop.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from ._ffi import ffi, lib

__all__ = ["Notifier"]

_DRAIN_BATCH = 1024
_all: weakref.WeakSet[Notifier] = weakref.WeakSet()


class Notifier:
    """An eventfd plus a completion queue of connection ids."""

    def __init__(self, capacity: int = 16384) -> None:
        self.ptr: Any = lib.asx_notifier_new(capacity)
        if self.ptr == ffi.NULL:
            raise OSError("could not create the notifier eventfd")
        self._ids = ffi.new("uint64_t[]", _DRAIN_BATCH)
        self.inherited = False   # made by the parent of this forked process
        _all.add(self)

    def fileno(self) -> int:
        return int(lib.asx_notifier_fd(self.ptr))

    def drain(self) -> list[int] | None:
        """Completed connection ids since the last drain; ``None``: overflowed, wake all.

        Raises RuntimeError on a notifier inherited through ``fork()``: its
        wake-ups belong to the parent.
        """
        if self.inherited:
            raise RuntimeError("this notifier belongs to the parent process (fork)")
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
        if ptr is None or ptr == ffi.NULL:
            return
        self.ptr = None
        if self.inherited:
            # our copy of the fd only; the struct stays (its lock may have
            # been held by a thread that did not come along)
            os.close(int(lib.asx_notifier_fd(ptr)))
        else:
            lib.asx_notifier_free(ptr)


def _disown_after_fork() -> None:
    for n in list(_all):
        n.inherited = True


os.register_at_fork(after_in_child=_disown_after_fork)
