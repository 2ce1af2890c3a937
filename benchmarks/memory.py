"""Memory per established TLS connection: anyio-asyncssl against the stdlib.

Each peer runs in its own process: N client/server pairs handshake over
memory BIOs (sans I/O, one thread), exchange 100 bytes, and stay open; the
growth of the resident set divided by 2N is reported, with the ratio to the
stdlib's ssl.SSLObject (what anyio's TLSStream and trio.SSLStream use).

    python benchmarks/memory.py [--connections 1000] [--key p256]
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
import gc, json, ssl, sys
kind, cert, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
keep = []
if kind.startswith("asyncssl"):
    import anyio_asyncssl as A
    from anyio_asyncssl.testing import pump
    off = A.Offload(workers=1) if kind == "asyncssl-offload" else None
    sctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
    sctx.load_cert_chain(cert)
    cctx = A.create_default_context(cafile=cert)
    def pair():
        s = A.TLSConnection(sctx, server_side=True)
        c = A.TLSConnection(cctx, server_hostname="localhost")
        pump(c, s)
        c.write(b"x" * 100)
        assert s.read(100, c.bytes_to_send())[1] == b"x" * 100
        return s, c
else:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert)
    cctx = ssl.create_default_context(cafile=cert)
    def pair():
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
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--key", default="p256", help="rsa2048 or p256")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from anyio_asyncssl.selfsigned import generate_self_signed

    kind, bits = ("ec", 256) if args.key == "p256" else ("rsa", int(args.key[3:]))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("localhost", key_type=kind, bits=bits)
        path = Path(tmp) / "both.pem"
        path.write_bytes(key + cert)
        res = {}
        for peer in ("stdlib-sslobject", "asyncssl", "asyncssl-offload"):
            out = subprocess.run([sys.executable, "-c", CODE, peer, str(path),
                                  str(args.connections)], capture_output=True, text=True,
                                 env=env, timeout=600, check=True).stdout
            res[peer] = json.loads(out)["kib_per_connection"]
    base = res["stdlib-sslobject"]
    print(f"{args.connections} connection pairs, key {args.key}")
    for peer, kib in res.items():
        print(f"{peer:20s} {kib:7.1f} KiB per connection   ratio {kib / base:5.2f}")


if __name__ == "__main__":
    main()
