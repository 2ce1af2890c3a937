"""CPU per handshake, in one process: anyio-asyncssl against anyio's TLSStream.

Client and server run in one event loop over a socketpair, so the process's
CPU time per handshake pair is the whole cost of both sides (with offload it
includes the worker thread's signing).  Reported as ratios against anyio's
TLSStream on the stdlib ssl module, per backend, in the same run.

    python benchmarks/handshake_cpu.py [--count 400] [--key rsa2048]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402
from anyio.streams.tls import TLSStream  # noqa: E402

import anyio_asyncssl as A  # noqa: E402
from anyio_asyncssl.selfsigned import generate_self_signed  # noqa: E402
from anyio_asyncssl.stream import AsyncTLSStream  # noqa: E402


async def _stream(sock: socket.socket) -> Any:
    from anyio._core._eventloop import get_async_backend

    return await get_async_backend().wrap_stream_socket(sock)


def measure(kind: str, backend: str, both: str, count: int) -> float:
    if kind == "anyio-stdlib":
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(both)
        cctx = ssl.create_default_context(cafile=both)

        def wrap(s: Any, server: bool) -> Any:
            return TLSStream.wrap(s, ssl_context=sctx if server else cctx, server_side=server,
                                  hostname=None if server else "localhost",
                                  standard_compatible=False)
    else:
        off = A.Offload(workers=1) if kind == "asyncssl-offload" else None
        actx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        actx.load_cert_chain(both)
        acctx = A.create_default_context(cafile=both)

        def wrap(s: Any, server: bool) -> Any:
            return AsyncTLSStream.wrap(s, context=actx if server else acctx, server_side=server,
                                       hostname=None if server else "localhost",
                                       standard_compatible=False)

    async def main() -> float:
        t0 = time.process_time()
        for _ in range(count):
            x, y = socket.socketpair()
            s1, s2 = await _stream(x), await _stream(y)
            async with anyio.create_task_group() as tg:
                async def server(s: Any = s1) -> None:
                    await wrap(s, True)

                tg.start_soon(server)
                await wrap(s2, False)
            await s1.aclose()
            await s2.aclose()
        return (time.process_time() - t0) / count * 1e3

    return float(anyio.run(main, backend=backend))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--key", default="rsa2048", help="rsa2048, rsa3072, rsa4096 or p256")
    args = p.parse_args()
    kind, bits = ("ec", 256) if args.key == "p256" else ("rsa", int(args.key[3:]))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("localhost", key_type=kind, bits=bits)
        both = Path(tmp) / "both.pem"
        both.write_bytes(key + cert)
        print(f"{args.count} handshake pairs in one process, key {args.key}")
        for backend in ("asyncio", "trio"):
            base = measure("anyio-stdlib", backend, str(both), args.count)
            line = f"{backend:8s} anyio-stdlib {base:.3f} ms"
            for kind_ in ("asyncssl", "asyncssl-offload"):
                v = measure(kind_, backend, str(both), args.count)
                line += f"   {kind_} {v:.3f} ms ({v / base:.2f}x)"
            print(line)


if __name__ == "__main__":
    main()
