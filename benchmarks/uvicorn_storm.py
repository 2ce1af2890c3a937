"""uvicorn under an RSA-4096 handshake storm: does its event loop keep ticking?

Three servers, each uvicorn serving the same ASGI app over TLS with an
RSA-4096 key, one at a time, in its own process:

* ``stock``: uvicorn as shipped (``ssl_certfile``/``ssl_keyfile``: asyncio's
  SSLProtocol on the stdlib's ssl; the signature runs on the loop);
* ``offload``: uvicorn on our loop (``loop="anyio_asyncssl.asyncio:new_event_loop"``)
  with a :class:`~anyio_asyncssl.TLSContext` whose key is offloaded
  (``ssl_context_factory``): the signature runs on worker threads;
* ``inline``: the same loop and a TLSContext without offload (the signature
  on the loop again: our layer without its reason to exist).

The app's lifespan starts a 1 ms ticker in the server's loop and records its
lateness.  A load generator in another process (``anyio_asyncssl.bench.load
handshake``, full TLS 1.3 handshakes, ``--concurrency`` in flight) storms
the server for ``--seconds``; then the ticker's lateness (p50, p99, max) and
the handshakes per second are read and reported as ratios against ``stock``
from the same run.

    python benchmarks/uvicorn_storm.py [--seconds 5] [--concurrency 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

VARIANTS = ("stock", "offload", "inline")

APP = r'''
import asyncio, json, sys, time

lateness = []

async def ticker():
    period = 0.001
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        lateness.append(time.perf_counter() - t0 - period)

def stats():
    xs = sorted(lateness) or [0.0]
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000
    return {"ticks": len(lateness), "lag_p50_ms": pick(0.5), "lag_p99_ms": pick(0.99),
            "lag_max_ms": xs[-1] * 1000}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                app.task = asyncio.ensure_future(ticker())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                app.task.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/reset":
        lateness.clear()
        body = b"{}"
    else:
        body = json.dumps(stats()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
'''

SERVER = r'''
import sys, ssl
sys.path.insert(0, sys.argv[5])
import uvicorn
from storm_app import app
variant, certfile, keyfile, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = dict(host="127.0.0.1", port=port, log_level="error", lifespan="on", access_log=False)
if variant == "stock":
    config = uvicorn.Config(app, ssl_certfile=certfile, ssl_keyfile=keyfile, loop="asyncio", **kw)
else:
    import anyio_asyncssl as A
    ctx = A.TLSContext(ssl.PROTOCOL_TLS_SERVER,
                       offload=A.Offload() if variant == "offload" else None)
    ctx.load_cert_chain(certfile, keyfile)
    # uvicorn refuses anything but an ssl.SSLContext from its own settings:
    # load them, then hand the loop our context (uvicorn passes config.ssl
    # to loop.create_server untouched)
    config = uvicorn.Config(app, ssl_certfile=certfile, ssl_keyfile=keyfile,
                            loop="anyio_asyncssl.asyncio:new_event_loop", **kw)
    config.load()
    config.ssl = ctx
uvicorn.Server(config).run()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> dict[str, Any]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx,
                                timeout=60) as r:
        return json.loads(r.read())   # type: ignore[no-any-return]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            get(port, "/reset")
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server never became ready")


def run_variant(variant: str, tmp: Path, certfile: str, keyfile: str, seconds: float,
                concurrency: int) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, variant, certfile, keyfile, str(port), str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_ready(port, server)
        time.sleep(0.5)
        get(port, "/reset")
        load = subprocess.run(
            [sys.executable, "-m", "anyio_asyncssl.bench.load", "handshake", str(port),
             "--concurrency", str(concurrency), "--seconds", str(seconds)],
            capture_output=True, text=True, timeout=seconds + 120, check=True)
        lag = get(port, "/stats")
        result = json.loads(load.stdout.strip().splitlines()[-1].split(" ", 1)[1])
        return {"variant": variant, **lag,
                "hs_per_s": result.get("handshakes", 0) / max(result.get("seconds", seconds),
                                                               1e-9),
                "load": result}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bits", type=int, default=4096)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from " + ", ".join(VARIANTS) + " (stock always runs)")
    args = p.parse_args(argv)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        print("uvicorn_storm needs uvicorn: pip install uvicorn", file=sys.stderr)
        return 2
    from anyio_asyncssl import generate_self_signed

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "storm_app.py").write_text(APP)
        cert, key = generate_self_signed(bits=args.bits)
        (tmp / "cert.pem").write_bytes(cert)
        (tmp / "key.pem").write_bytes(key)
        chosen = ["stock", *(v for v in args.variants.split(",") if v in VARIANTS
                             and v != "stock")]
        results = {v: run_variant(v, tmp, str(tmp / "cert.pem"), str(tmp / "key.pem"),
                                  args.seconds, args.concurrency) for v in chosen}
    stock = results["stock"]
    print(f"uvicorn, RSA-{args.bits}, {args.concurrency} handshakes in flight, "
          f"{args.seconds:g} s; ratios against stock uvicorn in this run")
    print(f"{'variant':<10}{'hs/s':>9}{'lag p50':>10}{'lag p99':>10}{'lag max':>10}"
          f"{'p99 ratio':>11}{'max ratio':>11}")
    for v, r in results.items():
        p99 = r["lag_p99_ms"] / max(stock["lag_p99_ms"], 1e-9)
        mx = r["lag_max_ms"] / max(stock["lag_max_ms"], 1e-9)
        r["p99_ratio"], r["max_ratio"] = p99, mx
        r["hs_ratio"] = r["hs_per_s"] / max(stock["hs_per_s"], 1e-9)
        print(f"{v:<10}{r['hs_per_s']:>9.1f}{r['lag_p50_ms']:>9.2f}m{r['lag_p99_ms']:>9.2f}m"
              f"{r['lag_max_ms']:>9.1f}m{p99:>11.3f}{mx:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps({"bits": args.bits, "seconds": args.seconds,
                                         "concurrency": args.concurrency,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
