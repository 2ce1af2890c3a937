"""How to test your own anyio server under offload faults (run with pytest).

The test engine makes the handshake's private-key operation slow, fail, or
notify early/twice/late, and can make every record encryption pause too.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import cast

import anyio
import pytest
import trustme

import anyio_asyncssl as A
from anyio_asyncssl.stream import AsyncTLSStream
from anyio_asyncssl.testing import TestEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def my_server(stream: AsyncTLSStream) -> None:
    """The code under test: reply to one request."""
    request = await stream.receive()
    await stream.send(b"reply to " + request)


async def test_server_survives_slow_and_failing_engine(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(tmp_path / "s.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    with A.Offload(workers=2) as offload:
        engine = TestEngine(offload)
        server_ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
        server_ctx.load_cert_chain(tmp_path / "s.pem")
        engine.enable_record_pauses(server_ctx)  # reads and writes pause too
        client_ctx = A.create_default_context(cafile=tmp_path / "ca.pem")

        async def one_exchange() -> bytes:
            multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
            # anyio types its listeners as plain Listeners; a TCP one is a SocketListener
            listener = cast(anyio.abc.SocketListener, multi.listeners[0])
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                async def serve_one() -> None:
                    sock = await listener.accept()
                    try:
                        server = await AsyncTLSStream.wrap(sock, context=server_ctx)
                        await my_server(server)
                        await server.aclose()
                    except A.AsyncEngineError:
                        await sock.aclose()
                    await listener.aclose()

                tg.start_soon(serve_one)
                tcp = await anyio.connect_tcp("127.0.0.1", port)
                client = await AsyncTLSStream.wrap(tcp, context=client_ctx, hostname="localhost")
                async with client:  # closing sends close_notify: the server's aclose waits for it
                    await client.send(b"ping")
                    reply = await client.receive()
            return reply

        with engine.inject(latency_ms=20):  # a slow accelerator
            assert await one_exchange() == b"reply to ping"
        with engine.inject(early=5, duplicate=5):  # sloppy notifications
            assert await one_exchange() == b"reply to ping"
