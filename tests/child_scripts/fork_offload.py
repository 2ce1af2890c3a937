"""Run by test_safety: fork a process whose parent already drove offloaded handshakes.

argv: server PEM (key + chain), CA PEM.  The parent runs an asyncio loop and
keeps making offloaded handshakes after the fork; the child (inside the same
task, so the parent's loop state came along) runs its own handshakes in a
new trio loop.  Before the fix the child's workers did not exist (its first
offloaded handshake waited forever) and both processes drained one eventfd
(the parent's loop missed wake-ups).  Exit status 0 when both sides finished.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys

import anyio
from socketpair_tls import one_handshake

import anyio_asyncssl as A
from anyio_asyncssl.testing import TestEngine

SERVER_PEM, CA_PEM = sys.argv[1], sys.argv[2]
ROUNDS = 20
offload = A.Offload(workers=2)
engine = TestEngine(offload)


def contexts() -> tuple[A.TLSContext, A.TLSContext]:
    sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    sctx.load_cert_chain(SERVER_PEM)
    return sctx, A.create_default_context(cafile=CA_PEM)


async def handshakes(n: int) -> int:
    """``n`` offloaded handshakes over socket pairs; returns operations offloaded."""
    sctx, cctx = contexts()
    before = offload.stats().completed
    for _ in range(n):
        await one_handshake(sctx, cctx)
    return offload.stats().completed - before


async def child_main() -> None:
    with anyio.fail_after(30):
        done = await handshakes(ROUNDS)
    workers = offload.stats().workers
    assert done >= ROUNDS, f"child: only {done} operations completed"
    assert workers == 2, f"child: {workers} workers"
    print(f"child ok: {done} offloaded, {workers} workers", flush=True)


async def parent_main() -> None:
    engine.set(latency_ms=5)          # every signature takes a while: real pauses
    with anyio.fail_after(30):
        assert await handshakes(1) >= 1
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # a new loop in the child; the parent's asyncio task state came along
            import trio

            trio.run(child_main)
            code = 0
        except BaseException as exc:  # report and exit: never return into the loop
            print(f"child failed: {exc!r}", flush=True)
        os._exit(code)
    try:
        with anyio.fail_after(30):
            done = await handshakes(ROUNDS)
        assert done >= ROUNDS
        print(f"parent ok: {done} offloaded", flush=True)
        with anyio.fail_after(40):
            while True:
                got, status = os.waitpid(pid, os.WNOHANG)
                if got:
                    break
                await anyio.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


anyio.run(parent_main)
print("done", flush=True)
