"""aiohttp's web server and client, TLS by anyio_asyncssl with private keys on offload workers.

    pip install aiohttp
    python examples/aiohttp_app.py [--port 8443] [--uvloop] [--write-cert ca.pem]
    python examples/aiohttp_app.py --get https://localhost:8443/ --cafile ca.pem

The server recipe needs no glue: ``web.run_app(app, ssl_context=context,
loop=new_event_loop())`` (or ``web.TCPSite(runner, host, port,
ssl_context=context)`` on such a loop); aiohttp hands the context to
``loop.create_server(ssl=...)`` untouched, and ``request.secure``,
``request.scheme`` and ``request.transport.get_extra_info("ssl_object")``
work as with the stdlib's TLS.  File responses are sent with
``loop.sendfile()``.

The client needs one helper: aiohttp refuses an ``ssl=`` that is not a
stdlib ``SSLContext``, so the context goes into
``anyio_asyncssl.recipes.TLSConnector(ssl=context)``, made on one of our
loops: ``ClientSession(connector=TLSConnector(ssl=context))``.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from anyio_asyncssl import Offload, TLSContext, create_default_context, generate_self_signed
from anyio_asyncssl.asyncio import new_event_loop


async def hello(request: web.Request) -> web.Response:
    tls = request.transport.get_extra_info("ssl_object") if request.transport else None
    version = tls.version() if tls is not None else None
    return web.Response(text=f"hello over {request.scheme} ({version})\n")


def serve(port: int, uvloop: bool, write_cert: str | None) -> None:
    offload = Offload()
    context = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    context.set_alpn_protocols(["http/1.1"])
    cert, key = generate_self_signed("localhost")
    if write_cert:
        Path(write_cert).write_bytes(cert)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "server.pem").write_bytes(key + cert)
        context.load_cert_chain(Path(tmp) / "server.pem")   # or (certfile, keyfile)

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context,  # type: ignore[arg-type]
                loop=new_event_loop(uvloop=uvloop))
    print(f"offload sign_ops={offload.stats().sign_ops}", flush=True)
    offload.close()


async def get(url: str, cafile: str | None) -> None:
    from anyio_asyncssl.recipes import TLSConnector

    context = create_default_context(cafile=cafile)   # offload=... for a client certificate
    context.set_alpn_protocols(["http/1.1"])
    async with aiohttp.ClientSession(connector=TLSConnector(ssl=context)) as session:
        async with session.get(url) as response:
            sys.stdout.write(f"{response.status} {await response.text()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p.add_argument("--write-cert", help="save the generated certificate here")
    p.add_argument("--get", metavar="URL", help="be the client: GET this URL")
    p.add_argument("--cafile", help="the client trusts this CA")
    a = p.parse_args()
    if a.get:
        loop = new_event_loop(uvloop=a.uvloop)
        try:
            loop.run_until_complete(get(a.get, a.cafile))
        finally:
            loop.close()
    else:
        serve(a.port, a.uvloop, a.write_cert)
