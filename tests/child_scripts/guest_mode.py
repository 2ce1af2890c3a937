"""Run by test_safety: trio in guest mode on asyncio, both driving offloaded handshakes.

argv: server PEM, CA PEM.  Two event loops in one thread: each must get its
own wake-ups.  With one notifier per thread each loop drained ids meant for
the other and dropped them, and the other loop's tasks never woke.  Exit
status 0 when both loops finished every handshake woken by the engine (no
wait ended by its safety bound).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import Any

import trio
from socketpair_tls import one_handshake

import anyio_asyncssl as A
from anyio_asyncssl.dispatch import current_dispatcher
from anyio_asyncssl.testing import TestEngine

SERVER_PEM, CA_PEM = sys.argv[1], sys.argv[2]
ROUNDS = 8
offload = A.Offload(workers=2)
TestEngine(offload).set(latency_ms=20)   # every signature really pauses
sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
sctx.load_cert_chain(SERVER_PEM)
cctx = A.create_default_context(cafile=CA_PEM)


async def handshakes() -> tuple[int, int]:
    for _ in range(ROUNDS):
        await one_handshake(sctx, cctx)
    d = current_dispatcher()
    return d.wakeups, d.timeouts


async def asyncio_main() -> None:
    loop = asyncio.get_running_loop()
    trio_done: asyncio.Future[Any] = loop.create_future()
    trio.lowlevel.start_guest_run(
        handshakes, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=trio_done.set_result)
    asyncio_result = await handshakes()
    trio_result = (await trio_done).unwrap()
    for name, (wakeups, timeouts) in (("asyncio", asyncio_result), ("trio", trio_result)):
        assert wakeups >= ROUNDS, (name, wakeups)   # woken by the engine ...
        assert timeouts == 0, (name, timeouts)      # ... never rescued by the bound
        print(f"{name}: {wakeups} wake-ups, {timeouts} bounded waits", flush=True)


asyncio.run(asyncio_main())
