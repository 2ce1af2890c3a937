"""Memory per established connection, sans I/O: our TLSConnection against ssl.SSLObject.

    python -m anyio_asyncssl.bench.sansio_memory KIND CERT_AND_KEY_PEM N

N client/server pairs handshake over memory BIOs in one thread, exchange 100
bytes and stay open; prints the growth of the resident set divided by 2N, in
KiB.  KIND: ``stdlib-sslobject``, ``asyncssl`` or ``asyncssl-offload``.
(What benchmarks/memory.py measured before run.py.)
"""

from __future__ import annotations

import gc
import json
import ssl
import sys
from typing import Any


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    kind, cert, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    keep: list[Any] = []
    if kind.startswith("asyncssl"):
        import anyio_asyncssl as A
        from anyio_asyncssl.testing import pump

        off = A.Offload(workers=1) if kind == "asyncssl-offload" else None
        actx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        actx.load_cert_chain(cert)
        acctx = A.create_default_context(cafile=cert)

        def pair() -> Any:
            s = A.TLSConnection(actx, server_side=True)
            c = A.TLSConnection(acctx, server_hostname="localhost")
            pump(c, s)
            c.write(b"x" * 100)
            assert s.read(100, c.bytes_to_send())[1] == b"x" * 100
            return s, c
    else:
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert)
        cctx = ssl.create_default_context(cafile=cert)

        def pair() -> Any:
            a, b, c2, d = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
            s = sctx.wrap_bio(a, b, server_side=True)
            cl = cctx.wrap_bio(c2, d, server_hostname="localhost")
            done = [False, False]
            while not all(done):
                for k, (o, outb, peer_in) in enumerate(((cl, d, a), (s, b, c2))):
                    if not done[k]:
                        try:
                            o.do_handshake()
                            done[k] = True
                        except ssl.SSLWantReadError:
                            pass
                    peer_in.write(outb.read())
            cl.write(b"x" * 100)
            a.write(d.read())
            assert s.read(100) == b"x" * 100
            return s, cl, a, b, c2, d
    pair()  # warm up (first-use allocations)
    gc.collect()
    r0 = rss()
    for _ in range(n):
        keep.append(pair())
    gc.collect()
    print(json.dumps({"kib_per_connection": (rss() - r0) / (2 * n) / 1024}))


if __name__ == "__main__":
    main()
