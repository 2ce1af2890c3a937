"""A TLS client on anyio: send a line, print the echo.

    python examples/client_anyio.py 127.0.0.1 8443 --cafile server-cert.pem
"""

from __future__ import annotations

import argparse

import anyio
from anyio.streams.tls import TLSAttribute

from anyio_asyncssl import create_default_context
from anyio_asyncssl.stream import connect_tcp


async def main(args: argparse.Namespace) -> None:
    context = create_default_context(cafile=args.cafile)
    async with await connect_tcp(args.host, args.port, context=context,
                                 hostname=args.hostname) as stream:
        print("connected:", stream.extra(TLSAttribute.tls_version),
              stream.extra(TLSAttribute.cipher))
        await stream.send(b"hello over async TLS\n")
        print("echo:", await stream.receive())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--cafile")
    p.add_argument("--hostname", default="localhost")
    anyio.run(main, p.parse_args())
