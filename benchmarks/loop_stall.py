"""Event-loop stall during handshake bursts: what the offload is for.

A server loop runs a 2 ms ticker while bursts of concurrent TLS handshakes
arrive (clients are stdlib blocking sockets in another process, so they do
not load the server's loop).  For each peer we report the ticker's lateness
(p50, p99, max) during the bursts and the burst's wall time, as ratios
against ``anyio-stdlib`` (anyio's TLSStream on the stdlib ssl module) in the
same run.  Private-key signing runs on the loop for every peer except
anyio-asyncssl with offload, where worker threads sign.

    python benchmarks/loop_stall.py [--key rsa4096] [--burst 20] [--rounds 5]
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

SERVER = r'''
import json, ssl, sys, time
kind, backend, certfile, keyfile = sys.argv[1:5]
lateness = []
stop = False

async def ticker(sleep):
    period = 0.002
    while not stop:
        t0 = time.perf_counter()
        await sleep(period)
        lateness.append(time.perf_counter() - t0 - period)

async def echo_anyio(stream):
    try:
        async with stream:
            while True:
                await stream.send(await stream.receive())
    except Exception:
        pass

def ctx_stdlib():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx

async def main_anyio():
    global stop
    import anyio
    if kind.startswith("asyncssl"):
        import anyio_asyncssl as A
        from anyio_asyncssl.stream import AsyncTLSListener
        off = A.Offload() if kind == "asyncssl-offload" else None
        ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=off)
        ctx.load_cert_chain(certfile, keyfile)
        make = lambda l: AsyncTLSListener(l, ctx, standard_compatible=False)
    else:
        from anyio.streams.tls import TLSListener
        make = lambda l: TLSListener(l, ctx_stdlib(), standard_compatible=False)
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(make(tcp).serve, echo_anyio)
        print(port, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)   # "go"
        tg.start_soon(ticker, anyio.sleep)
        await anyio.to_thread.run_sync(sys.stdin.readline)   # "done"
        stop = True
        tg.cancel_scope.cancel()

async def main_trio():
    global stop
    import functools, trio
    async def echo(stream):
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except Exception:
            pass
    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(
            trio.serve_ssl_over_tcp, echo, 0, ctx_stdlib(), host="127.0.0.1"))
        print(listeners[0].transport_listener.socket.getsockname()[1], flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        n.start_soon(ticker, trio.sleep)
        await trio.to_thread.run_sync(sys.stdin.readline)
        stop = True
        n.cancel_scope.cancel()

if kind == "trio-sslstream":
    import trio
    trio.run(main_trio)
else:
    import anyio
    anyio.run(main_anyio, backend=backend)
lat = sorted(lateness) or [0.0]
print("RESULT " + json.dumps({"p50": lat[len(lat) // 2] * 1e3,
                              "p99": lat[int(len(lat) * 0.99)] * 1e3,
                              "max": lat[-1] * 1e3, "ticks": len(lat)}), flush=True)
'''

CLIENTS = r'''
import socket, ssl, sys, time, threading
port, cafile, burst, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context(cafile=cafile)
def one():
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"x"); s.recv(1)
walls = []
for r in range(rounds):
    ts = [threading.Thread(target=one) for _ in range(burst)]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    walls.append(time.perf_counter() - t0)
    time.sleep(0.1)
print(sum(walls) / len(walls))
'''

PEERS = [("asyncssl-offload", "asyncio"), ("asyncssl-offload", "trio"),
         ("asyncssl-nooffload", "asyncio"), ("anyio-stdlib", "asyncio"),
         ("anyio-stdlib", "trio"), ("trio-sslstream", "trio")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", default="rsa4096", help="rsa2048, rsa3072, rsa4096 or p256")
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from anyio_asyncssl.selfsigned import generate_self_signed

    kind, bits = ("ec", 256) if args.key == "p256" else ("rsa", int(args.key[3:]))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("localhost", key_type=kind, bits=bits)
        (Path(tmp) / "c.pem").write_bytes(cert)
        (Path(tmp) / "k.pem").write_bytes(key)
        for peer, backend in PEERS:
            srv = subprocess.Popen([sys.executable, "-c", SERVER, peer, backend,
                                    f"{tmp}/c.pem", f"{tmp}/k.pem"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env)
            try:
                assert srv.stdin is not None and srv.stdout is not None
                port = int(srv.stdout.readline())
                srv.stdin.write("go\n")
                srv.stdin.flush()
                wall = float(subprocess.run(
                    [sys.executable, "-c", CLIENTS, str(port), f"{tmp}/c.pem",
                     str(args.burst), str(args.rounds)],
                    capture_output=True, text=True, timeout=300, check=True).stdout)
                srv.stdin.write("done\n")
                srv.stdin.flush()
                out, _ = srv.communicate(timeout=60)
            finally:
                srv.kill()
            r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            r["burst_wall_ms"] = wall * 1e3
            results[f"{peer}/{backend}"] = r
    base = results["anyio-stdlib/asyncio"]
    print(f"\nkey {args.key}, bursts of {args.burst} concurrent handshakes x {args.rounds}, "
          f"2 ms ticker, {os.cpu_count()} CPUs")
    print(f"{'peer':28s} {'lag p50':>8s} {'lag p99':>8s} {'lag max':>8s} {'max/base':>8s} "
          f"{'burst ms':>9s} {'wall/base':>9s}")
    for name, r in results.items():
        print(f"{name:28s} {r['p50']:8.2f} {r['p99']:8.2f} {r['max']:8.2f} "
              f"{r['max'] / base['max']:8.2f} {r['burst_wall_ms']:9.1f} "
              f"{r['burst_wall_ms'] / base['burst_wall_ms']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
