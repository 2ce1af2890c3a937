"""Several event loops in several threads share one Offload (rule 3: jobs stay on their thread)."""

from __future__ import annotations

import threading

import anyio
from anyio.abc import SocketAttribute
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream, connect_tcp
from anyio_asyncssl.testing import TestEngine


def test_two_loops_in_two_threads_share_one_offload(pki: Pki, offload: A.Offload,
                                                    engine: TestEngine) -> None:
    engine.set(latency_ms=2)
    before = offload.stats().completed
    errors: list[BaseException] = []
    served: list[int] = []

    async def one_loop(n_clients: int) -> None:
        sctx = pki.server_ctx("ec", offload=offload)
        engine.enable_record_pauses(sctx)

        async def echo(stream: AsyncTLSStream) -> None:
            async with stream:
                data = await stream.receive()
                await stream.send(data)
                served.append(threading.get_ident())

        multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = multi.extra(SocketAttribute.local_port)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(AsyncTLSListener(multi, sctx).serve, echo)

                async def client(i: int) -> None:
                    async with await connect_tcp("127.0.0.1", port, context=pki.client_ctx(),
                                                 hostname="localhost") as c:
                        await c.send(b"thread client %d" % i)
                        assert await c.receive() == b"thread client %d" % i

                async with anyio.create_task_group() as clients:
                    for i in range(n_clients):
                        clients.start_soon(client, i)
                tg.cancel_scope.cancel()

    def run(backend: str) -> None:
        try:
            anyio.run(one_loop, 15, backend=backend)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in ("asyncio", "trio", "asyncio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(served) == 45
    assert len(set(served)) == 3  # each loop served its own clients on its own thread
    st = offload.stats()
    assert st.completed - before >= 45  # every handshake signed (and records paused) on workers
    assert st.in_flight == 0
    assert A.connection_counters()["paused_now"] == 0
