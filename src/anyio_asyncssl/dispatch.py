"""Per-loop dispatch of engine wake-ups to the tasks that wait for them.

Theory of operation
-------------------
Each running event loop gets one :class:`LoopDispatcher` with a
:class:`~anyio_asyncssl.notifier.Notifier` of its own.  A connection driven
in that loop posts its wake-ups there (the driver attaches the loop's
notifier before the first step).  asyncio (and uvloop): the loop's
``add_reader`` calls :meth:`LoopDispatcher.dispatch` when the eventfd is
readable, no task needed.  trio: a system task waits on the fd.  Either
way, ``dispatch`` drains the completed connection ids and sets the event of
the task waiting for each; ids nobody waits for are dropped, which is safe
because wake-ups are level-style (the waiter compares the connection's
wake-up counter before it sleeps, and every wait is bounded).

One notifier per loop, not per thread: with two loops in one thread (trio
in guest mode on asyncio), a per-thread notifier let each loop drain ids
meant for the other and drop them, and the other's tasks never woke.

Every wait is bounded (:meth:`LoopDispatcher.wait` takes a timeout): a lost
wake-up costs one retry after the bound, never a hang.  The dispatcher
also reaps, on its thread, connections parked with a paused job
(:func:`~anyio_asyncssl.parking.reap_parked`), since their wake-ups arrive
here too, and hands job-pool slots to tasks that got ``WANT_ASYNC_JOB``.

After ``fork()`` the child forgets every dispatcher: a loop made in the
child gets a new one with a new notifier, never the parent's eventfd.
"""

from __future__ import annotations

import collections
import os
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .notifier import Notifier
from .parking import reap_parked

__all__ = ["LoopDispatcher", "current_dispatcher"]


class LoopDispatcher:
    """Routes one loop's notifier wake-ups to that loop's waiting tasks."""

    def __init__(self, checkpoint_if_cancelled: Callable[[], Awaitable[None]]) -> None:
        self.notifier = Notifier()
        #: this loop's own checkpoint_if_cancelled (anyio's looks the loop up each call)
        self.checkpoint_if_cancelled = checkpoint_if_cancelled
        self.waiters: dict[int, anyio.Event] = {}   # connection id -> its waiter
        self.job_waiters: collections.deque[anyio.Event] = collections.deque()
        self.wakeups = 0                    # drains that found work (for tests)
        self.job_waits = 0
        self.timeouts = 0                   # waits that ended by their bound

    def dispatch(self) -> None:
        """Drain the notifier; wake the task of each completed connection."""
        ids = self.notifier.drain()
        if ids is None:  # the queue overflowed: everyone re-checks
            for ev in list(self.waiters.values()):
                ev.set()
        else:
            waiters = self.waiters
            for conn_id in ids:
                waiter = waiters.get(conn_id)
                if waiter is not None:
                    waiter.set()
        self.wakeups += 1
        reap_parked()

    def release_job_waiter(self) -> None:
        """A step finished or did not pause: one WANT_ASYNC_JOB waiter may retry."""
        if self.job_waiters:
            self.job_waiters.popleft().set()

    async def wait_for_job(self, timeout: float) -> None:
        """Wait for a job slot (after WANT_ASYNC_JOB); ``timeout`` bounds a lost wake-up."""
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

    async def wait(self, conn_id: int, ready: Callable[[], bool], timeout: float) -> bool:
        """Wait for a wake-up for ``conn_id`` unless ``ready()`` holds; at most ``timeout``.

        Returning says "re-check", not "done": the caller retries its step.
        Returns whether it waited at all (a schedule point).
        """
        if ready():
            return False
        ev = anyio.Event()
        self.waiters[conn_id] = ev
        try:
            if ready():  # a wake-up may have come in meanwhile
                return False
            with anyio.move_on_after(timeout) as scope:
                await ev.wait()
            if scope.cancelled_caught:
                self.timeouts += 1
            return True
        finally:
            if self.waiters.get(conn_id) is ev:
                del self.waiters[conn_id]


_trio_dispatchers: dict[Any, LoopDispatcher] = {}  # trio: root task -> dispatcher
_asyncio_dispatchers: weakref.WeakKeyDictionary[Any, LoopDispatcher] = (
    weakref.WeakKeyDictionary())


def current_dispatcher() -> LoopDispatcher:
    """The dispatcher of the running event loop (asyncio or trio), made on first use."""
    if _in_trio():
        import trio

        key: Any = trio.lowlevel.current_root_task()
        d = _trio_dispatchers.get(key)
        if d is None:
            d = LoopDispatcher(trio.lowlevel.checkpoint_if_cancelled)
            _trio_dispatchers[key] = d
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
        d = LoopDispatcher(anyio.lowlevel.checkpoint_if_cancelled)
        _asyncio_dispatchers[loop] = d
        # the loop keeps the dispatcher (and its notifier's fd) alive through
        # this reader for as long as the loop lives; the fd is closed only
        # when the loop is gone, so it can never be closed under the selector
        loop.add_reader(d.notifier.fileno(), d.dispatch)
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
        _trio_dispatchers.pop(key, None)


def _forget_after_fork() -> None:
    _trio_dispatchers.clear()
    _asyncio_dispatchers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
