"""Bulk transfer: MB/s and CPU per GiB, anyio-asyncssl against anyio's TLSStream.

One process per peer; a client task sends ``--mib`` MiB in 64 KiB writes over
loopback TCP to a server task in the same loop that reads it all.  Reported
as ratios against ``anyio-stdlib`` in the same run.  ``asyncssl-always``
keeps OpenSSL's async mode on for every record (a job per call, docs/architecture.md rule
10) with no record offload, to show what async mode alone costs.

    python benchmarks/bulk.py [--mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CODE = r'''
import json, ssl, sys, time
import anyio
kind, backend, both, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind.startswith("asyncssl"):
    import anyio_asyncssl as A
    from anyio_asyncssl.stream import AsyncTLSStream as S
    sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=A.Offload(1),
                        async_mode="always" if kind == "asyncssl-always" else "handshake")
    sctx.load_cert_chain(both)
    cctx = A.create_default_context(cafile=both)
    wrap = lambda s, server: S.wrap(s, context=sctx if server else cctx, server_side=server,
                                    hostname=None if server else "localhost")
else:
    from anyio.streams.tls import TLSStream as S
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(both)
    cctx = ssl.create_default_context(cafile=both)
    wrap = lambda s, server: S.wrap(s, ssl_context=sctx if server else cctx, server_side=server,
                                    hostname=None if server else "localhost")
total = mib * 1024 * 1024
chunk = b"x" * 65536
async def main():
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = multi.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    result = {}
    async def server():
        s = await wrap(await listener.accept(), True)
        got = 0
        while got < total:
            got += len(await s.receive())
        await s.send(b"k")
    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        c = await wrap(await anyio.connect_tcp("127.0.0.1", port), False)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(total // len(chunk)):
            await c.send(chunk)
        await c.receive()
        result = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    print(json.dumps(result))
anyio.run(main, backend=backend)
'''

PEERS = [("asyncssl", "asyncio"), ("asyncssl-always", "asyncio"), ("anyio-stdlib", "asyncio"),
         ("asyncssl", "trio"), ("anyio-stdlib", "trio")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from anyio_asyncssl.selfsigned import generate_self_signed

    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("localhost", key_type="ec")
        both = Path(tmp) / "both.pem"
        both.write_bytes(key + cert)
        for peer, backend in PEERS:
            out = subprocess.run([sys.executable, "-c", CODE, peer, backend, str(both),
                                  str(args.mib)], capture_output=True, text=True, env=env,
                                 timeout=600, check=True).stdout
            res[f"{peer}/{backend}"] = json.loads(out)
    print(f"{args.mib} MiB one way over loopback TCP, 64 KiB writes, TLS 1.3 AES-256-GCM")
    for name, r in res.items():
        base = res[f"anyio-stdlib/{name.split('/')[1]}"]
        mbs = args.mib / r["seconds"]
        cpu_gib = r["cpu"] / args.mib * 1024
        print(f"{name:26s} {mbs:8.0f} MiB/s  ratio {mbs / (args.mib / base['seconds']):5.2f}   "
              f"CPU {cpu_gib:5.2f} s/GiB  ratio {r['cpu'] / base['cpu']:5.2f}")


if __name__ == "__main__":
    main()
