"""The offload engine: our OpenSSL provider plus a pool of worker threads.

An :class:`Offload` owns a private OpenSSL library context holding the
``default`` provider and our ``asyncssl-offload`` provider.  Private keys
loaded into a :class:`~anyio_asyncssl.TLSContext` made with ``offload=`` are
rebuilt inside our provider; libssl then signs (or, for static-RSA key
exchange, decrypts) through it.  Inside an async job the provider hands the
operation to a worker thread and pauses the job; the worker wakes the event
loop through the connection's async callback.  The default library context,
which the stdlib :mod:`ssl` module uses, is never changed.
"""

from __future__ import annotations

import atexit
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._ffi import ffi, lib
from .errors import TLSError, error_from_queue, raise_from_queue

__all__ = ["Offload", "OffloadStats", "default_offload"]


@dataclass(frozen=True)
class OffloadStats:
    """Counters of one :class:`Offload` (each read atomically, not as one snapshot)."""

    workers: int
    submitted: int
    completed: int
    in_flight: int
    inline: int
    pauses: int
    spurious_resumes: int
    queue_full: int
    errors: int
    notify_callback: int
    notify_fd: int
    sign_ops: int
    decrypt_ops: int
    cipher_ops: int
    mean_latency_ms: float
    max_latency_ms: float
    min_stack_headroom: int  # bytes of fibre stack left in our code (-1: never in a job)


WorkerPriority = Literal["low", "idle", "normal"]
_PRIORITIES: dict[WorkerPriority, int] = {
    "normal": lib.ASX_WORKERS_NORMAL, "low": lib.ASX_WORKERS_LOW, "idle": lib.ASX_WORKERS_IDLE}

_live: weakref.WeakSet[Offload] = weakref.WeakSet()
# the C entry that installs our providers (a module global, so a test can fail it)
_install_offload = lib.asx_install_offload


# [True] once the interpreter exits: nothing is freed from then on (OpenSSL's
# own atexit cleanup runs after Python's finalisation)
_exit_state: list[bool] = [False]


class Offload:
    """Worker-thread offload of private-key operations (an OpenSSL provider).

    ``workers`` defaults to the number of CPUs.  ``priority``: how the
    workers are scheduled, so that they never take the event loop's core:
    ``"low"`` (default: nice 19, so a busy loop thread always preempts them),
    ``"idle"`` (``SCHED_IDLE``: they run only on a CPU nothing else wants;
    on a machine saturated by other work, signatures may then wait long) or
    ``"normal"``.  ``cpus``: the CPUs the workers may run on (default: any).
    The loop thread is never changed.

    ``close()`` drains queued operations and joins the threads; it also runs
    at interpreter exit.  Operations that arrive after ``close()`` are
    computed inline.
    """

    def __init__(self, workers: int | None = None, *, priority: WorkerPriority = "low",
                 cpus: Iterable[int] | None = None) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if priority not in _PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, not {priority!r}")
        cpu_list = sorted(set(cpus)) if cpus is not None else []
        if any(not 0 <= c < 1024 for c in cpu_list):
            raise ValueError(f"cpus must be CPU numbers, got {cpu_list}")
        self._lock = threading.Lock()
        self._closed = False
        # set only once everything exists: a failed __init__ leaves __del__
        # nothing to free (it used to free the pool a second time)
        self._pool: Any = None
        self._libctx: Any = None
        lib.ERR_clear_error()
        cpu_array = ffi.new("int[]", cpu_list or [0])
        pool = lib.asx_pool_new(workers, _PRIORITIES[priority], cpu_array, len(cpu_list))
        if pool == ffi.NULL:
            raise MemoryError("could not start the offload worker pool")
        libctx = lib.OSSL_LIB_CTX_new()
        if libctx == ffi.NULL:
            lib.asx_pool_unref(pool)
            raise MemoryError("could not create the offload's OpenSSL library context")
        if not _install_offload(libctx, pool):
            err = error_from_queue("could not load the offload provider", TLSError)
            lib.asx_unload_providers(libctx)
            lib.OSSL_LIB_CTX_free(libctx)
            lib.asx_pool_unref(pool)
            raise err
        self._pool = pool
        self._libctx = libctx
        self._property_query = "?asyncssl.sign=yes"
        self._providers: list[str] = []
        self._registered: set[str] = set()
        _live.add(self)

    # -- what contexts use ------------------------------------------------
    @property
    def libctx(self) -> Any:
        """The private ``OSSL_LIB_CTX*`` (cffi pointer)."""
        return self._libctx

    @property
    def property_query(self) -> str:
        """The property query new SSL_CTXs are made with."""
        return self._property_query

    @property
    def workers(self) -> int:
        """Worker threads serving operations now (0 after :meth:`close`)."""
        return int(lib.asx_pool_workers(self._pool))

    @property
    def priority(self) -> WorkerPriority:
        """How the workers run (``"normal"`` when the system refused to lower them)."""
        got = int(lib.asx_pool_priority(self._pool))
        return next(name for name, value in _PRIORITIES.items() if value == got)

    @property
    def providers(self) -> tuple[str, ...]:
        """Extra providers loaded with :meth:`load_provider`."""
        return tuple(self._providers)

    def load_provider(self, name: str, *, properties: str | None = None,
                      path: str | os.PathLike[str] | None = None,
                      params: Mapping[str, str] | None = None) -> None:
        """Load a provider (e.g. a hardware vendor's) into this library context.

        ``path``: the provider's module file (default: ``name`` in OpenSSL's
        modules directory).  ``params``: the provider's configuration
        parameters (e.g. pkcs11-provider's ``pkcs11-module-path`` and
        ``pkcs11-module-token-pin``), given to it as an OpenSSL config
        section would, so no global config file is needed.

        ``properties`` (default ``?provider=<name>``) is added to the
        property query of contexts created afterwards, so libssl prefers the
        provider's algorithms where it offers them and falls back to ours or
        to ``default`` elsewhere.  Record ciphers are fetched when an SSL_CTX
        is made: load providers before creating contexts, or use
        :meth:`TLSContext.load_provider`, which rebuilds its SSL_CTX.

        Raises :class:`TLSError` if OpenSSL cannot load it (a missing module,
        a parameter it refuses), ``ValueError`` for a name or parameter
        that cannot be written as configuration.
        """
        self._load(name, path=path, params=params)
        extra = properties if properties is not None else f"?provider={name}"
        if extra and extra not in self._property_query.split(","):
            self._property_query = f"{extra},{self._property_query}"

    def _load(self, name: str, *, path: str | os.PathLike[str] | None = None,
              params: Mapping[str, str] | None = None) -> None:
        """Load a provider into the library context; no property query changes.

        :meth:`TLSContext.load_provider` uses this, so that preferring a
        provider in one context does not change contexts made afterwards.
        With ``path`` or ``params`` the provider is loaded the way an
        OpenSSL config file would load it (OpenSSL 3.0 has no other way to
        give a provider parameters): a config naming only this provider is
        written to a private temporary file and loaded into this library
        context alone.
        """
        if name in self._providers:
            return
        lib.ERR_clear_error()
        if path is None and not params:
            prov = lib.OSSL_PROVIDER_load(self._libctx, name.encode())
            if prov == ffi.NULL:
                raise_from_queue(f"could not load provider {name!r}")
        else:
            config = provider_config(name, path, params or {})
            with tempfile.NamedTemporaryFile("w", prefix="asyncssl-provider-",
                                             suffix=".cnf") as f:   # mode 0600
                f.write(config)
                f.flush()
                ok = lib.OSSL_LIB_CTX_load_config(self._libctx, f.name.encode())
            if ok != 1 or not lib.OSSL_PROVIDER_available(self._libctx, name.encode()):
                raise_from_queue(f"could not load provider {name!r}"
                                 + (f" from {os.fspath(path)!r}" if path is not None else ""))
        self._providers.append(name)

    def register_test_provider(self, name: str) -> None:
        """Register our test record-cipher provider under ``name`` (not loaded yet)."""
        if name in self._registered:
            return
        if not lib.asx_register_test_provider(self._libctx, name.encode(), self._pool):
            raise_from_queue(f"could not register test provider {name!r}")
        self._registered.add(name)

    # -- observation and control ------------------------------------------
    def stats(self) -> OffloadStats:
        """Counters: submitted, completed, in flight, pauses, queue-full, latency."""
        st = ffi.new("asx_pool_stats *")
        lib.asx_pool_get_stats(self._pool, st)
        completed = int(st.completed)
        return OffloadStats(
            workers=self.workers,
            submitted=int(st.submitted),
            completed=completed,
            in_flight=int(st.submitted) - completed,
            inline=int(st.inline_ops),
            pauses=int(st.pauses),
            spurious_resumes=int(st.spurious_resumes),
            queue_full=int(st.queue_full),
            errors=int(st.errors),
            notify_callback=int(st.notify_callback),
            notify_fd=int(st.notify_fd),
            sign_ops=int(st.sign_ops),
            decrypt_ops=int(st.decrypt_ops),
            cipher_ops=int(st.cipher_ops),
            mean_latency_ms=(st.latency_ns_total / completed / 1e6) if completed else 0.0,
            max_latency_ms=st.latency_ns_max / 1e6,
            min_stack_headroom=int(st.min_stack_headroom),
        )

    def reset_stats(self) -> None:
        """Zero the counters."""
        lib.asx_pool_reset_stats(self._pool)

    def _set_faults(self, **faults: int) -> None:
        f = ffi.new("asx_faults *")
        lib.asx_pool_get_faults(self._pool, f)
        for key, value in faults.items():
            setattr(f, key, int(value))
        lib.asx_pool_set_faults(self._pool, f)

    def _get_faults(self) -> dict[str, int]:
        f = ffi.new("asx_faults *")
        lib.asx_pool_get_faults(self._pool, f)
        return {k: int(getattr(f, k)) for k in (
            "latency_us", "late_ms", "eagain_count", "err_count", "early_count",
            "duplicate_count", "fd_only", "max_queue", "inline_latency_us")}

    def close(self) -> None:
        """Drain queued operations and join the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        lib.asx_pool_close(self._pool)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Offload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self, _lib: Any = lib, _exit: list[bool] = _exit_state) -> None:
        # The library context is freed by C once no SSL_CTX made in it is
        # left (provider_core.c, "Lifetime"): the cycle collector may run
        # this before the __del__ of a context that dies with us.  Module
        # globals may already be None at interpreter exit: what this needs
        # is bound as defaults.
        pool = getattr(self, "_pool", None)
        libctx = getattr(self, "_libctx", None)
        if pool is None or libctx is None or _exit[0]:
            return
        self.close()
        _lib.asx_libctx_release(libctx)
        _lib.asx_pool_unref(pool)

    def __repr__(self) -> str:
        return f"<Offload workers={self.workers} providers={self._providers}>"


_default: Offload | None = None
_default_lock = threading.Lock()


_CONFIG_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def provider_config(name: str, path: str | os.PathLike[str] | None,
                    params: Mapping[str, str]) -> str:
    """An OpenSSL config that loads one provider, from ``path``, with ``params``.

    Values are quoted and escaped (OpenSSL would expand ``$`` and cut at
    ``#``); names and keys must be plain words.  Raises ``ValueError``.
    """
    for word in (name, *params):
        if not _CONFIG_NAME.fullmatch(word):
            raise ValueError(f"{word!r}: provider names and parameter keys are letters, "
                             "digits, '_', '.', '-'")

    def quoted(value: str) -> str:
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError("provider parameters are single lines")
        for ch in ("\\", '"', "$", "#"):
            value = value.replace(ch, "\\" + ch)
        return f'"{value}"'

    lines = ["openssl_conf = asyncssl_init", "[asyncssl_init]",
             "providers = asyncssl_providers", "[asyncssl_providers]",
             f"{name} = asyncssl_provider", "[asyncssl_provider]"]
    if path is not None:
        lines.append(f"module = {quoted(os.fspath(path))}")
    lines += [f"{key} = {quoted(str(value))}" for key, value in params.items()]
    lines.append("activate = 1")
    return "\n".join(lines) + "\n"


def default_offload() -> Offload:
    """A process-wide :class:`Offload` with one worker per CPU, made on first use."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Offload()
        return _default


def _restart_workers_in_child() -> None:
    """After fork(): the child's pools have no threads (pool.c); start fresh ones."""
    for off in list(_live):
        off._lock = threading.Lock()   # a parent's thread may have held it
        if not off._closed and off._pool is not None:
            lib.asx_pool_restart(off._pool)


os.register_at_fork(after_in_child=_restart_workers_in_child)


@atexit.register
def _close_all() -> None:
    _exit_state[0] = True
    for off in list(_live):
        off.close()
