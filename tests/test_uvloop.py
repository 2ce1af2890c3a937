"""The anyio face on uvloop (asyncio backend): the notifier's add_reader path."""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import SocketAttribute
from conftest import Pki

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream, connect_tcp
from anyio_asyncssl.testing import TestEngine

pytestmark = pytest.mark.anyio

uvloop = pytest.importorskip("uvloop", reason="pip install uvloop (in the test extra)")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return "asyncio", {"use_uvloop": True}


async def test_echo_with_every_operation_paused_on_uvloop(pki: Pki, offload: A.Offload,
                                                          engine: TestEngine) -> None:
    import asyncio

    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    sctx = pki.server_ctx("rsa", offload=offload)
    engine.enable_record_pauses(sctx)
    engine.set(latency_ms=1)
    before = offload.stats().pauses

    async def echo(stream: AsyncTLSStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive())
            except anyio.EndOfStream:
                pass

    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = multi.extra(SocketAttribute.local_port)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(AsyncTLSListener(multi, sctx).serve, echo)
            for _ in range(3):
                async with await connect_tcp("127.0.0.1", port, context=pki.client_ctx(),
                                             hostname="localhost") as client:
                    payload = bytes(range(256)) * 200
                    await client.send(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += await client.receive()
                    assert got == payload
            tg.cancel_scope.cancel()
    assert offload.stats().pauses > before + 3  # handshakes and records paused
