"""Which thread owns a connection, and where a connection dropped mid-job waits.

Theory of operation
-------------------
An OpenSSL async job resumes only on the OS thread that started it (rule 3
of docs/architecture.md), and while the owning thread is inside OpenSSL
(cffi releases the GIL during a step) no other thread may touch that SSL
object.  So a connection belongs to one thread, the first that uses it.

Threads are told apart by a :class:`ThreadToken`: an object kept in the
thread's ``threading.local`` that dies with the thread.  Tokens carry a
serial number that is never reused, unlike ``threading.get_ident()``, which
glibc hands to the next thread as soon as one exits: with thread ids, a new
thread passed for a dead one, resumed its job (``ASYNC: INTERNAL_ERROR``) and
read through its freed per-thread buffer.  After ``fork()`` the child's only
thread gets a fresh token, so connections made before the fork stay the
parent's.

A connection dropped while a job is paused cannot be freed (rule 4): its
handle is *parked* under its owner's serial.  :func:`reap_parked`, which the
event-loop dispatcher calls whenever wake-ups arrive on the owning thread,
retries the paused operation and frees the connection once the job has
finished.  A parked connection whose owner thread has exited can never
finish its job: it is leaked on purpose and counted (``leaked``).
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import weakref
from typing import Any, Protocol

from ._ffi import ffi, lib
from .errors import drain_queue

__all__ = [
    "Parkable",
    "ThreadToken",
    "connection_counters",
    "current_thread_serial",
    "park",
    "reap_parked",
    "thread_alive",
]


class ThreadToken:
    """The identity of one OS thread for as long as it lives (never reused)."""

    __slots__ = ("__weakref__", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial


_serials = itertools.count(1)
_alive: weakref.WeakValueDictionary[int, ThreadToken] = weakref.WeakValueDictionary()
#: per thread: ``token`` (keeps it alive) and ``serial`` (read on hot paths)
local = threading.local()


def _new_token() -> int:
    token = ThreadToken(next(_serials))
    local.token = token
    local.serial = token.serial
    _alive[token.serial] = token
    return token.serial


def current_thread_serial() -> int:
    """This thread's serial number (made on first use, gone with the thread)."""
    try:
        serial: int = local.serial
    except AttributeError:
        serial = _new_token()
    return serial


def thread_alive(serial: int) -> bool:
    """Whether the thread with this serial still runs (in this process)."""
    return serial in _alive


class Parkable(Protocol):
    """What the registry needs of a connection's handle."""

    conn: Any
    owner: int | None
    parked: bool
    result: Any


_lock = threading.Lock()
_parked: dict[int, list[Parkable]] = {}
_leaked: list[Parkable] = []   # kept, never freed: their jobs can never finish
#: handles with a paused job, by owner serial (set_job_pool refuses while any)
paused: dict[int, set[Parkable]] = {}
counters = {"created": 0, "freed": 0, "parked": 0, "reaped": 0, "leaked": 0}


def park(handle: Parkable) -> None:
    """Keep ``handle`` (its job is paused) until its owner thread can finish the job."""
    handle.parked = True
    owner = handle.owner
    with _lock:
        counters["parked"] += 1
        if owner is None or not thread_alive(owner):
            _leaked.append(handle)
            counters["leaked"] += 1
        else:
            _parked.setdefault(owner, []).append(handle)


def _leak_orphans() -> None:
    """Under _lock: parked connections of exited threads can never be freed."""
    for serial in [s for s in _parked if s not in _alive]:
        orphans = _parked.pop(serial)
        _leaked.extend(orphans)
        counters["leaked"] += len(orphans)


def reap_parked() -> int:
    """Finish the paused jobs of dropped connections of this thread; free them.

    Returns how many were freed.  Safe to call any time on any thread: only
    this thread's parked connections are touched.
    """
    me = current_thread_serial()
    with _lock:
        mine = _parked.pop(me, [])
        if _parked:
            _leak_orphans()
    if not mine:
        return 0
    keep: list[Parkable] = []
    freed = 0
    for h in mine:
        c = h.conn
        lib.asx_step(c, c.pending_op, ffi.NULL, 0, 0, ffi.NULL, 0, h.result)
        drain_queue()
        if c.pending_op == lib.ASX_OP_NONE and lib.asx_conn_free(c):
            h.conn = None
            freed += 1
        else:
            keep.append(h)
    with _lock:
        if keep:
            _parked.setdefault(me, []).extend(keep)
        for h in mine:
            if h.conn is None:
                paused.get(me, set()).discard(h)
        counters["reaped"] += freed
        counters["freed"] += freed
    return freed


def connection_counters() -> dict[str, int]:
    """created, freed, parked (ever), reaped, leaked, live, parked_now, paused_now."""
    with _lock:
        _leak_orphans()
        out = dict(counters)
        out["parked_now"] = sum(len(v) for v in _parked.values())
        out["paused_now"] = sum(len(v) for v in paused.values())
    out["live"] = out["created"] - out["freed"]
    return out


def count(key: str) -> None:
    with _lock:
        counters[key] += 1


def mark_paused(owner: int, handle: Parkable) -> None:
    """A job of ``handle`` paused (on its owner thread)."""
    with _lock:
        paused.setdefault(owner, set()).add(handle)


def mark_resumed(owner: int, handle: Parkable) -> None:
    """The paused job of ``handle`` finished."""
    with _lock:
        paused.get(owner, set()).discard(handle)


def has_paused_jobs(owner: int) -> bool:
    with _lock:
        return bool(paused.get(owner))


def _after_fork_in_child() -> None:
    # the parent's threads did not come along: nothing of theirs can ever be
    # resumed here, and this thread is a new one
    global _lock
    _lock = threading.Lock()
    _new_token()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _count_leaked_at_exit() -> None:  # pragma: no cover - interpreter exit
    with _lock:
        counters["leaked"] += sum(len(v) for v in _parked.values())
