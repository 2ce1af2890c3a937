"""Offload lifecycle, stats, the notifier queue, async-mode scope, import checks."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl._ffi import check_runtime
from anyio_asyncssl.testing import TestEngine, pump


def test_import_refuses_old_openssl() -> None:
    with pytest.raises(ImportError, match=r"OpenSSL >= 3\.0.*found OpenSSL 1\.1\.1w"):
        check_runtime(0x1010117F, "OpenSSL 1.1.1w", True)


def test_import_refuses_without_async_jobs() -> None:
    with pytest.raises(ImportError, match="ASYNC_is_capable"):
        check_runtime(0x30000130, "OpenSSL 3.0.19", False)
    check_runtime(0x30000130, "OpenSSL 3.0.19", True)  # fine


def _handshake(pki: Pki, offload: A.Offload) -> tuple[A.TLSConnection, A.TLSConnection]:
    s = A.TLSConnection(pki.server_ctx("rsa", offload=offload), server_side=True)
    c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    pump(c, s)
    return c, s


def test_stats_count_offloaded_operations_and_latency(pki: Pki) -> None:
    with A.Offload(workers=1) as off:
        TestEngine(off).set(latency_ms=3)
        for _ in range(3):
            _handshake(pki, off)
        st = off.stats()
    assert st.submitted == st.completed == 3
    assert st.in_flight == 0
    assert st.sign_ops == 3 and st.pauses >= 3
    assert st.notify_callback == 3
    assert 3.0 <= st.mean_latency_ms <= st.max_latency_ms
    assert 0 < st.min_stack_headroom < 32 * 1024  # our code ran on the job's fibre stack


def test_close_drains_queued_operations_then_runs_inline(pki: Pki) -> None:
    off = A.Offload(workers=1)
    engine = TestEngine(off)
    engine.set(latency_ms=30)
    sctx = pki.server_ctx("rsa", offload=off)
    pairs = [(A.TLSConnection(pki.client_ctx(), server_hostname="localhost"),
              A.TLSConnection(sctx, server_side=True)) for _ in range(3)]
    # start all three handshakes so that three signatures are queued
    for c, s in pairs:
        s.receive_bytes(c.bytes_to_send() if c.do_handshake() else b"")
        assert s.do_handshake() is A.Status.WANT_ASYNC
    assert off.stats().in_flight == 3
    off.close()  # joins the worker only after it finished all three
    st = off.stats()
    assert st.completed == 3 and st.in_flight == 0 and st.workers == 0
    for c, s in pairs:  # the paused jobs resume and complete
        pump(c, s)
    before = off.stats().inline
    _handshake(pki, off)  # after close: computed inline, no pause
    assert off.stats().inline == before + 1
    assert off.stats().submitted == 3
    off.close()  # idempotent


def test_interpreter_exit_with_operations_in_flight_is_clean(pki: Pki) -> None:
    code = textwrap.dedent(f"""
        import ssl, anyio_asyncssl as A
        from anyio_asyncssl.testing import TestEngine
        off = A.Offload(workers=1)
        TestEngine(off).set(latency_ms=200)
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        ctx.load_cert_chain({str(pki.rsa_file)!r})
        cctx = A.create_default_context(cafile={str(pki.ca_file)!r})
        c = A.TLSConnection(cctx, server_hostname="localhost")
        s = A.TLSConnection(ctx, server_side=True)
        c.do_handshake()
        assert s.do_handshake(c.bytes_to_send()) is A.Status.WANT_ASYNC
        print("paused", off.stats().in_flight, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "paused 1"


def test_notifier_receives_connection_ids_from_the_c_callback(pki: Pki,
                                                              offload: A.Offload) -> None:
    TestEngine(offload).set(latency_ms=2)
    n = A.Notifier()
    s = A.TLSConnection(pki.server_ctx("rsa", offload=offload), server_side=True)
    s.attach_notifier(n)
    c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    pump(c, s)
    ids = n.drain()
    assert ids is not None and s.id in ids
    assert s.stats()["callbacks_on_worker"] >= 1
    assert n.drain() == []  # drained


def test_notifier_overflow_asks_everyone_to_recheck() -> None:
    n = A.Notifier(capacity=16)
    for i in range(40):
        n.post(i)
    assert n.drain() is None
    n.post(7)
    assert n.drain() == [7]


def test_notifier_posts_from_many_threads_are_all_delivered() -> None:
    n = A.Notifier(capacity=10000)

    def post_500(k: int) -> None:
        for i in range(500):
            n.post(k * 1000 + i)

    threads = [threading.Thread(target=post_500, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = n.drain()
    assert got is not None and sorted(got) == sorted(k * 1000 + i for k in range(4)
                                                     for i in range(500))


def test_async_mode_handshake_only_by_default_with_offload(pki: Pki,
                                                           offload: A.Offload) -> None:
    c, s = _handshake(pki, offload)
    assert s.context.async_mode == "handshake"
    assert not s.async_active  # reads and writes run without jobs
    assert not c.async_active  # no offload, no async mode


def test_async_mode_always_keeps_jobs_for_records(pki: Pki, offload: A.Offload) -> None:
    sctx = pki.server_ctx("rsa", offload=offload)
    sctx.async_mode = "always"
    s = A.TLSConnection(sctx, server_side=True)
    c = A.TLSConnection(pki.client_ctx(), server_hostname="localhost")
    pump(c, s)
    assert s.async_active
    assert c.write(b"ping") == (A.Status.DONE, 4)
    st, data = s.read(100, c.bytes_to_send())
    assert (st, data) == (A.Status.DONE, b"ping")


def test_async_mode_off_without_offload(pki: Pki) -> None:
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER)
    assert ctx.async_mode == "off"
    ctx.load_cert_chain(pki.rsa_file)
    s = A.TLSConnection(ctx, server_side=True)
    assert not s.async_active


def test_default_offload_is_shared_and_renewed_after_close() -> None:
    a = A.default_offload()
    assert A.default_offload() is a
    a.close()
    b = A.default_offload()
    assert b is not a and not b.closed


def test_the_sans_io_core_imports_no_event_loop_library() -> None:
    code = ("import sys, anyio_asyncssl, anyio_asyncssl.testing; "
            "from anyio_asyncssl import TLSConnection, TLSContext, Offload; "
            "assert 'anyio' not in sys.modules and 'trio' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('anyio', 'trio'))]; "
            "from anyio_asyncssl import AsyncTLSStream; assert 'anyio' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_an_offload_dropped_on_another_thread_leaves_the_process_exit_clean(pki: Pki) -> None:
    """A library context freed on one thread after another thread's handshake used it.

    OpenSSL keeps each thread's DRBGs of a library context and cleans up only
    the freeing thread's; the main thread's cleanup at exit (OPENSSL_cleanup)
    then read the freed context's lock: the full suite died with SIGSEGV after
    its summary, 2 runs in 4, and this child spun at exit for ever.  Contexts
    are retired, not freed (provider_core.c).
    """
    code = textwrap.dedent("""
        import gc, ssl, sys, threading
        import anyio_asyncssl as A
        from anyio_asyncssl.testing import pump
        for _ in range(3):
            off = A.Offload(workers=1)
            sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
            sctx.load_cert_chain(sys.argv[1])
            cctx = A.create_default_context(cafile=sys.argv[2], offload=off)
            pump(A.TLSConnection(cctx, server_hostname="localhost"),
                 A.TLSConnection(sctx, server_side=True))   # this thread's DRBGs
            box = [sctx, cctx, off]
            del sctx, cctx, off
            def drop():   # the last reference goes on another thread
                box[2].close()
                box.clear()
                gc.collect()
            t = threading.Thread(target=drop)
            t.start()
            t.join()
        print("done")
        """)
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(pki.ec_file), str(pki.ca_file)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MALLOC_PERTURB_": "165"})
    except subprocess.TimeoutExpired:
        raise AssertionError("the process never exited (it spun in OPENSSL_cleanup)") from None
    assert (proc.returncode, proc.stdout.strip()) == (0, "done"), proc.stderr[-3000:]
