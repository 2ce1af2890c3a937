"""Offload, seen from the event loop: a 5 ms ticker during RSA-4096 handshakes, offload on and off.

    python examples/offload_demo.py [--handshakes 40] [--key-type rsa4096]

The server runs here, on anyio, with a task that asks to wake every 5 ms
and records how late it wakes (the loop's lag).  A separate process makes
TLS handshakes with 4 concurrent stdlib clients.  With offload on, worker
threads sign and the ticker keeps its beat; with it off, each RSA-4096
signature (several ms) runs on the loop and every tick behind it is late.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import tempfile
import time
from pathlib import Path

import anyio
from anyio.abc import SocketAttribute

from anyio_asyncssl import Offload, TLSContext, generate_self_signed
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream

TICK = 0.005
CLIENTS = """
import socket, ssl, sys, threading
port, cafile, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=cafile)
def worker(k):
    for _ in range(k):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"x"); tls.recv(1)
threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"""


async def echo(stream: AsyncTLSStream) -> None:
    try:
        async with stream:   # closing it sends close_notify: the client may be gone
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass


async def measure(context: TLSContext, cafile: Path, handshakes: int) -> tuple[float, float, float]:
    """Run the storm; (seconds, p99 lag ms, max lag ms)."""
    lags: list[float] = []
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        async def ticker() -> None:
            while True:
                t0 = time.perf_counter()
                await anyio.sleep(TICK)
                lags.append((time.perf_counter() - t0 - TICK) * 1000)

        tg.start_soon(AsyncTLSListener(tcp, context).serve, echo)
        tg.start_soon(ticker)
        t0 = time.perf_counter()
        await anyio.run_process([sys.executable, "-c", CLIENTS, str(port), str(cafile),
                                 str(handshakes)], stdout=None, stderr=None)
        elapsed = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    lags.sort()
    return elapsed, lags[int(0.99 * (len(lags) - 1))], lags[-1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--handshakes", type=int, default=40)
    p.add_argument("--key-type", default="rsa4096", choices=("rsa2048", "rsa3072", "rsa4096"))
    p.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    a = p.parse_args()
    bits = int(a.key_type[3:])
    cert, key = generate_self_signed("localhost", bits=bits)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "server.pem").write_bytes(key + cert)
        (Path(tmp) / "ca.pem").write_bytes(cert)
        print(f"{a.handshakes} RSA-{bits} handshakes, 4 concurrent clients, "
              f"a {TICK * 1000:.0f} ms ticker on the server's loop ({a.backend})")
        print(f"{'offload':>8} {'seconds':>8} {'lag p99 ms':>11} {'lag max ms':>11}")
        for offload in (Offload(), None):
            context = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
            context.load_cert_chain(Path(tmp) / "server.pem")
            elapsed, p99, worst = anyio.run(measure, context, Path(tmp) / "ca.pem",
                                            a.handshakes, backend=a.backend)
            print(f"{'on' if offload else 'off':>8} {elapsed:8.2f} {p99:11.1f} {worst:11.1f}",
                  flush=True)
            if offload is not None:
                offload.close()


if __name__ == "__main__":
    main()
