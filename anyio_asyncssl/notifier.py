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

import collections
import sys
import threading
import weakref
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


# -- waiting inside an event loop ----------------------------------------------
# One dispatcher per running event loop.  asyncio: the loop's add_reader()
# calls _dispatch (no task needed).  trio: a system task waits on the fd.
# Waiting tasks park on their own anyio.Event, keyed by connection id.

class LoopDispatcher:
    """Routes notifier wake-ups to the tasks of one event loop."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.waiters: dict[int, Any] = {}   # connection id -> anyio.Event
        self.job_waiters: collections.deque[Any] = collections.deque()
        self.wakeups = 0                    # drains that found work (for tests)
        self.job_waits = 0

    def dispatch(self) -> None:
        ids = self.notifier.drain()
        from .connection import reap_parked

        if ids is None:  # the queue overflowed: everyone re-checks
            for ev in list(self.waiters.values()):
                ev.set()
        else:
            for conn_id in ids:
                ev = self.waiters.get(conn_id)
                if ev is not None:
                    ev.set()
        self.wakeups += 1
        reap_parked()

    def release_job_waiter(self) -> None:
        """A step finished or did not pause: one WANT_ASYNC_JOB waiter may retry."""
        if self.job_waiters:
            self.job_waiters.popleft().set()

    async def wait_for_job(self, timeout: float) -> None:
        """Wait for a job slot (after WANT_ASYNC_JOB); ``timeout`` bounds a lost wake-up."""
        import anyio

        self.job_waits += 1
        ev = anyio.Event()
        self.job_waiters.append(ev)
        try:
            with anyio.move_on_after(timeout):
                await ev.wait()
        finally:
            if not ev.is_set():
                try:
                    self.job_waiters.remove(ev)
                except ValueError:
                    pass

    async def wait(self, conn_id: int, ready: Any) -> None:
        """Wait until a wake-up for ``conn_id`` arrives, unless ``ready()`` already holds."""
        import anyio

        if ready():
            return
        ev = anyio.Event()
        self.waiters[conn_id] = ev
        try:
            if not ready():  # a wake-up may have come in meanwhile
                await ev.wait()
        finally:
            if self.waiters.get(conn_id) is ev:
                del self.waiters[conn_id]


_dispatchers: dict[Any, LoopDispatcher] = {}  # trio: root task -> dispatcher
_asyncio_dispatchers: weakref.WeakKeyDictionary[Any, LoopDispatcher] = (
    weakref.WeakKeyDictionary())


def current_dispatcher() -> LoopDispatcher:
    """The dispatcher of the running event loop (asyncio or trio), made on first use."""
    if _in_trio():
        import trio

        key: Any = trio.lowlevel.current_root_task()
        d = _dispatchers.get(key)
        if d is None:
            d = LoopDispatcher(Notifier.for_current_thread())
            _dispatchers[key] = d
            trio.lowlevel.spawn_system_task(_trio_dispatch_loop, d, key,
                                            name="anyio_asyncssl notifier")
        return d
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("anyio_asyncssl needs a running asyncio or trio event loop") from None
    d = _asyncio_dispatchers.get(loop)
    if d is None:
        d = LoopDispatcher(Notifier.for_current_thread())
        _asyncio_dispatchers[loop] = d
        loop.add_reader(d.notifier.fileno(), d.dispatch)
        _forget_when_closed(loop, d)
    return d


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def _trio_dispatch_loop(d: LoopDispatcher, key: Any) -> None:
    import trio

    fd = d.notifier.fileno()
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            d.dispatch()
    finally:
        _dispatchers.pop(key, None)


def _forget_when_closed(loop: Any, d: LoopDispatcher) -> None:
    """Drop the loop's entry (and its fd registration) when the loop closes."""
    original_close = loop.close

    def close() -> None:
        _asyncio_dispatchers.pop(loop, None)
        try:
            if not loop.is_closed():
                loop.remove_reader(d.notifier.fileno())
        finally:
            original_close()

    try:
        loop.close = close
    except AttributeError:  # pragma: no cover - exotic loops
        pass
