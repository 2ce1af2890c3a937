"""A Starlette app on uvicorn, TLS by anyio_asyncssl with the private key on offload workers.

    pip install uvicorn starlette
    python examples/uvicorn_app.py [--port 8443] [--uvloop] [--write-cert ca.pem]
    curl --cacert ca.pem https://localhost:8443/

The recipe is four lines (FastAPI apps are served the same way):

* ``loop="anyio_asyncssl.asyncio:new_event_loop"``: uvicorn's ``loop``
  setting takes an import string for a loop factory (``...:new_uvloop_event_loop``
  for uvloop); that loop's ``create_server`` accepts a ``TLSContext``;
* ``config.load()`` then ``config.ssl = context``: uvicorn hands
  ``config.ssl`` to ``loop.create_server(ssl=...)`` untouched.  Set it
  *after* ``load()``, which would replace it (and leave ``ssl_certfile``
  unset: uvicorn would otherwise build a stdlib context from it);
* ``uvicorn.Server(config).run()``: one process.  (``uvicorn.run()``,
  ``--workers`` and ``--reload`` make a new Config in each process, so they
  cannot carry a ready context.)

uvicorn tells the app ``scheme == "https"`` from the transport's
``get_extra_info("sslcontext")``, which our transport answers.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from anyio_asyncssl import Offload, TLSContext, generate_self_signed


async def hello(request: Request) -> PlainTextResponse:
    loop = type(asyncio.get_running_loop()).__name__
    return PlainTextResponse(f"hello over {request.url.scheme} on {loop}\n")


app = Starlette(routes=[Route("/", hello)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p.add_argument("--write-cert", help="save the generated certificate here")
    a = p.parse_args()

    offload = Offload()
    context = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    cert, key = generate_self_signed("localhost")
    if a.write_cert:
        Path(a.write_cert).write_bytes(cert)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "server.pem").write_bytes(key + cert)
        context.load_cert_chain(Path(tmp) / "server.pem")   # or (certfile, keyfile)

    factory = "new_uvloop_event_loop" if a.uvloop else "new_event_loop"
    config = uvicorn.Config(app, host="127.0.0.1", port=a.port,
                            loop=f"anyio_asyncssl.asyncio:{factory}")
    config.load()
    config.ssl = context  # type: ignore[assignment]  # uvicorn's hint says ssl.SSLContext
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass   # uvicorn shuts down gracefully, then raises Ctrl-C again
    print(f"offload sign_ops={offload.stats().sign_ops}", flush=True)
    offload.close()


if __name__ == "__main__":
    main()
