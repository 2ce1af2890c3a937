"""Handshake throughput and event-loop stall: anyio-asyncssl against its peers.

Each server runs in its own process on 127.0.0.1 with an echo handler and a
ticker task that measures how late the loop wakes it (the stall that
private-key crypto on the loop causes).  Load comes from `openssl s_time`
clients (C, so the load generator is not the bottleneck): each does full
handshakes (no resumption) back to back.  Results are reported as ratios
against ``anyio-stdlib`` (anyio's own TLSStream on the stdlib ssl module) in
the same run, never as absolute targets.

    python benchmarks/handshake.py [--seconds 4] [--clients 4] [--key rsa3072]

Peers: anyio-asyncssl with offload (asyncio, trio), anyio-asyncssl without
offload, anyio TLSStream (asyncio, trio), trio.SSLStream, asyncio's native
SSL transport, uvloop's, and nginx when it is installed (apt-get install nginx).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SERVER_CODE = r'''
import json, os, ssl, sys, time
kind, backend, port, certfile, keyfile, seconds = sys.argv[1:7]
port = int(port); seconds = float(seconds)
lateness = []
handshakes = [0]
OFFLOAD = None

async def ticker(sleep):
    period = 0.005
    while True:
        t0 = time.perf_counter()
        await sleep(period)
        lateness.append(time.perf_counter() - t0 - period)

def report():
    lat = sorted(lateness) or [0.0]
    out = {"handshakes": handshakes[0],
           "lag_p50_ms": lat[len(lat) // 2] * 1e3,
           "lag_p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
           "lag_max_ms": lat[-1] * 1e3,
           "cpu_s": time.process_time()}
    if OFFLOAD is not None:
        st = OFFLOAD.stats()
        out["offloaded"] = st.completed
        out["pauses"] = st.pauses
    print("RESULT " + json.dumps(out), flush=True)

if kind in ("asyncssl-offload", "asyncssl-nooffload", "anyio-stdlib"):
    import anyio
    if kind.startswith("asyncssl"):
        import anyio_asyncssl as A
        from anyio_asyncssl.stream import AsyncTLSListener
        off = OFFLOAD = A.Offload() if kind == "asyncssl-offload" else None
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        ctx.load_cert_chain(certfile, keyfile)
        make = lambda l: AsyncTLSListener(l, ctx, standard_compatible=False)
    else:
        from anyio.streams.tls import TLSListener
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        make = lambda l: TLSListener(l, ctx, standard_compatible=False)

    async def handler(stream):
        handshakes[0] += 1
        try:
            async with stream:
                while True:
                    await stream.send(await stream.receive())
        except Exception:
            pass

    async def main():
        listener = make(await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port))
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker, anyio.sleep)
            tg.start_soon(listener.serve, handler)
            print("READY", flush=True)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
        report()
    anyio.run(main, backend=backend)
elif kind == "trio-sslstream":
    import trio
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)

    async def handler(stream):
        try:
            await stream.do_handshake()
            handshakes[0] += 1
            while True:
                data = await stream.receive_some()
                if not data:
                    break
                await stream.send_all(data)
        except Exception:
            pass

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(ticker, trio.sleep)
            import functools
            await n.start(functools.partial(trio.serve_ssl_over_tcp, handler, port, ctx,
                                            host="127.0.0.1"))
            print("READY", flush=True)
            await trio.sleep(seconds)
            n.cancel_scope.cancel()
        report()
    trio.run(main)
elif kind in ("asyncio-native", "uvloop-native"):
    import asyncio
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)

    async def handler(reader, writer):
        handshakes[0] += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        writer.close()

    async def main():
        server = await asyncio.start_server(handler, "127.0.0.1", port, ssl=ctx)
        t = asyncio.create_task(ticker(asyncio.sleep))
        print("READY", flush=True)
        await asyncio.sleep(seconds)
        t.cancel()
        server.close()
        report()
    if kind == "uvloop-native":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_cert(tmp: Path, key: str) -> tuple[str, str]:
    sys.path.insert(0, str(HERE.parent))
    from anyio_asyncssl.selfsigned import generate_self_signed

    kind, bits = ("ec", 256) if key == "p256" else ("rsa", int(key[3:]))
    cert, pem_key = generate_self_signed("localhost", key_type=kind, bits=bits)
    (tmp / "cert.pem").write_bytes(cert)
    (tmp / "key.pem").write_bytes(pem_key)
    return str(tmp / "cert.pem"), str(tmp / "key.pem")


def load(port: int, clients: int, seconds: float) -> int:
    """Run `openssl s_time` clients; returns handshakes they counted."""
    procs = [subprocess.Popen(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
         "-time", str(int(seconds))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True) for _ in range(clients)]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 30)
        for line in out.splitlines():
            if "connections in" in line and "real seconds" in line:
                total += int(line.split()[0])
    return total


def run_peer(kind: str, backend: str, cert: str, key: str, args: argparse.Namespace,
             tmp: Path) -> dict[str, float] | None:
    port = free_port()
    server_seconds = args.seconds + 2
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    if kind == "nginx":
        return run_nginx(port, cert, key, args, tmp)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, kind, backend, str(port), cert, key,
         str(server_seconds)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "READY" not in line:
            return None
        t0 = time.perf_counter()
        client_count = load(port, args.clients, args.seconds)
        elapsed = time.perf_counter() - t0
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    # handshakes as the clients count them (a server may see the client gone
    # before its post-handshake send and count the handshake as failed)
    result["handshakes"] = client_count
    result["hs_per_s"] = client_count / elapsed
    result["cpu_ms_per_hs"] = 1e3 * result["cpu_s"] / max(client_count, 1)
    return result


def run_nginx(port: int, cert: str, key: str, args: argparse.Namespace,
              tmp: Path) -> dict[str, float] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx is None:
        return None
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_session_cache off; ssl_session_tickets off; location / {{ return 200 "ok"; }} }} }}
""")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)],
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        t0 = time.perf_counter()
        n = load(port, args.clients, args.seconds)
        return {"hs_per_s": n / (time.perf_counter() - t0), "handshakes": n}
    finally:
        proc.terminate()
        proc.wait(10)


PEERS = [
    ("asyncssl-offload", "asyncio"), ("asyncssl-offload", "trio"),
    ("asyncssl-nooffload", "asyncio"), ("anyio-stdlib", "asyncio"), ("anyio-stdlib", "trio"),
    ("trio-sslstream", "trio"), ("asyncio-native", "asyncio"), ("uvloop-native", "asyncio"),
    ("nginx", "-"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--key", default="rsa3072", help="rsa2048, rsa3072, rsa4096 or p256")
    p.add_argument("--only", help="comma-separated peer names")
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    if not shutil.which("openssl"):
        sys.exit("needs the openssl command-line tool (apt-get install openssl)")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cert, key = make_cert(tmp, args.key)
        results: dict[str, dict[str, float]] = {}
        for kind, backend in PEERS:
            name = kind if backend == "-" else f"{kind}/{backend}"
            if args.only and kind not in args.only.split(","):
                continue
            r = run_peer(kind, backend, cert, key, args, tmp)
            if r is None:
                print(f"{name:32s} (not available)")
                continue
            results[name] = r
    base = results.get("anyio-stdlib/asyncio", {}).get("hs_per_s") or 0.0
    print(f"\nkey {args.key}, {args.clients} s_time clients, {args.seconds:.0f} s each, "
          f"{os.cpu_count()} CPUs")
    print(f"{'peer':32s} {'hs/s':>8s} {'ratio':>6s} {'lag p50':>8s} {'lag p99':>8s} "
          f"{'lag max':>8s} {'cpu ms/hs':>9s}")
    for name, r in results.items():
        ratio = r["hs_per_s"] / base if base else float("nan")
        lag = [f"{r[k]:8.2f}" if k in r else f"{'-':>8s}"
               for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms")]
        cpu = f"{r['cpu_ms_per_hs']:9.2f}" if "cpu_ms_per_hs" in r else f"{'-':>9s}"
        print(f"{name:32s} {r['hs_per_s']:8.0f} {ratio:6.2f} {' '.join(lag)} {cpu}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
