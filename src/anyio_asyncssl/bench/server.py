"""One Python server peer in its own process: a TLS echo server with a 1 ms ticker.

    python -m anyio_asyncssl.bench.server PEER CERTFILE KEYFILE

Prints ``READY <port>`` once it listens on 127.0.0.1.  Then it obeys lines on
standard input:

* ``start``: forget everything so far (ticks, handshakes, CPU baselines);
* ``stop``: print ``RESULT {json}`` with what happened since ``start`` and exit.

The JSON has the handshakes the server completed, the CPU time of the whole
process and of the loop thread alone (``/proc/self/task/<tid>/stat``), the
ticker's lateness (actual minus expected sleep) p50/p99/max in ms, the
resident set (``/proc/self/statm``) at ``start`` and at ``stop``, the open
connections, and the :meth:`Offload.stats` when the peer has an offload.

Only the public API of anyio_asyncssl is used, so that this keeps working
while the internals change.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Literal

TICK = 0.001
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RECEIVE = 65536

logging.disable(logging.CRITICAL)  # handshake errors of clients that just hang up


def thread_cpu(tid: int) -> float:
    """utime + stime of one thread, in seconds."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Meter:
    """What the server counts between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.loop_tid = threading.get_native_id()
        self.lateness: list[float] = []
        self.handshakes = 0
        self.open = 0
        self.offload: Any = None
        self.start()

    def start(self) -> None:
        gc.collect()
        self.lateness = []
        self.handshakes = 0
        self.cpu0 = process_cpu()
        self.loop_cpu0 = thread_cpu(self.loop_tid)
        self.rss0 = rss()
        self.t0 = time.perf_counter()
        if self.offload is not None:
            self.offload.reset_stats()

    def result(self) -> dict[str, Any]:
        gc.collect()
        lat = sorted(self.lateness) or [0.0]
        out: dict[str, Any] = {
            "seconds": time.perf_counter() - self.t0,
            "handshakes": self.handshakes,
            "cpu_s": process_cpu() - self.cpu0,
            "loop_cpu_s": thread_cpu(self.loop_tid) - self.loop_cpu0,
            "ticks": len(self.lateness),
            "lag_p50_ms": lat[len(lat) // 2] * 1e3,
            "lag_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "lag_max_ms": lat[-1] * 1e3,
            "rss0": self.rss0,
            "rss": rss(),
            "open": self.open,
        }
        if self.offload is not None:
            out["offload"] = asdict(self.offload.stats())
        return out

    async def ticker(self, sleep: Callable[[float], Awaitable[Any]]) -> None:
        perf = time.perf_counter
        while True:
            t0 = perf()
            await sleep(TICK)
            self.lateness.append(perf() - t0 - TICK)

    def command(self, line: str) -> bool:
        """Obey one control line; True when the server should stop."""
        if line.strip() == "start":
            self.start()
            print("STARTED", flush=True)
            return False
        print("RESULT " + json.dumps(self.result()), flush=True)
        return True


M = Meter()


def stdlib_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def asyncssl_context(peer: str, certfile: str, keyfile: str) -> Any:
    import anyio_asyncssl as A

    offload = None if peer.endswith("-nooffload") else A.Offload(workers=2)
    mode: Literal["always"] | None = "always" if peer.endswith("-always") else None
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload, async_mode=mode)
    ctx.load_cert_chain(certfile, keyfile)
    M.offload = offload
    return ctx


def ready(port: int) -> None:
    print(f"READY {port}", flush=True)


# -- anyio: our anyio face, and anyio's own TLSStream ----------------------------------

def run_anyio(peer: str, backend: str, certfile: str, keyfile: str) -> None:
    import anyio
    from anyio.abc import SocketAttribute

    if peer.startswith("asyncssl"):
        from anyio_asyncssl.stream import AsyncTLSListener

        actx = asyncssl_context(peer, certfile, keyfile)

        def make(tcp: Any) -> Any:
            return AsyncTLSListener(tcp, actx, standard_compatible=False)
    else:
        from anyio.streams.tls import TLSListener

        sctx = stdlib_context(certfile, keyfile)

        def make(tcp: Any) -> Any:
            return TLSListener(tcp, sctx, standard_compatible=False)

    async def echo(stream: Any) -> None:
        M.handshakes += 1
        M.open += 1
        try:
            async with stream:
                while True:
                    await stream.send(await stream.receive(RECEIVE))
        except Exception:
            pass
        finally:
            M.open -= 1

    async def main() -> None:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", backlog=4096)
        async with anyio.create_task_group() as tg:
            tg.start_soon(M.ticker, anyio.sleep)
            tg.start_soon(make(tcp).serve, echo)
            ready(tcp.extra(SocketAttribute.local_port))
            while not M.command(await anyio.to_thread.run_sync(sys.stdin.readline)):
                pass
            tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)


# -- trio: our trio face, and trio.SSLStream --------------------------------------------

def run_trio(peer: str, certfile: str, keyfile: str) -> None:
    import trio

    if peer.startswith("asyncssl"):
        from anyio_asyncssl.trio import TrioTLSListener

        actx = asyncssl_context(peer, certfile, keyfile)

        def make(tcp: Any) -> Any:
            return TrioTLSListener(tcp, actx)
    else:
        sctx = stdlib_context(certfile, keyfile)

        def make(tcp: Any) -> Any:
            return trio.SSLListener(tcp, sctx)

    async def echo(stream: Any) -> None:
        try:
            await stream.do_handshake()
        except Exception:
            await trio.aclose_forcefully(stream)
            return
        M.handshakes += 1
        M.open += 1
        try:
            while data := await stream.receive_some(RECEIVE):
                await stream.send_all(data)
        except Exception:
            pass
        finally:
            M.open -= 1
            await trio.aclose_forcefully(stream)

    async def main() -> None:
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        async with trio.open_nursery() as n:
            n.start_soon(M.ticker, trio.sleep)
            n.start_soon(trio.serve_listeners, echo, [make(t) for t in tcp])
            ready(tcp[0].socket.getsockname()[1])
            while not M.command(await trio.to_thread.run_sync(sys.stdin.readline)):
                pass
            n.cancel_scope.cancel()

    trio.run(main)


# -- asyncio start_server(ssl=), on asyncio's loop or uvloop's ------------------------

def run_asyncio(use_uvloop: bool, certfile: str, keyfile: str) -> None:
    import asyncio

    sctx = stdlib_context(certfile, keyfile)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        M.handshakes += 1
        M.open += 1
        try:
            while data := await reader.read(RECEIVE):
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            M.open -= 1
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=sctx, backlog=4096)
        ticker = asyncio.create_task(M.ticker(asyncio.sleep))
        ready(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while not M.command(await loop.run_in_executor(None, sys.stdin.readline)):
            pass
        ticker.cancel()
        server.close()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def main() -> None:
    peer, certfile, keyfile = sys.argv[1:4]
    if peer.startswith("asyncssl-anyio-"):
        backend = peer.split("-")[2]
        run_anyio(peer, backend, certfile, keyfile)
    elif peer.startswith("anyio-tlsstream-"):
        run_anyio(peer, peer.rsplit("-", 1)[1], certfile, keyfile)
    elif peer in ("trio-sslstream",) or peer.startswith("asyncssl-trio"):
        run_trio(peer, certfile, keyfile)
    elif peer in ("asyncio", "uvloop"):
        run_asyncio(peer == "uvloop", certfile, keyfile)
    else:
        sys.exit(f"unknown peer {peer}")
    sys.stdout.flush()
    os._exit(0)  # no slow interpreter teardown (offload worker joins, 1000 sockets)


if __name__ == "__main__":
    main()
