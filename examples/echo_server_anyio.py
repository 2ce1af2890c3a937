"""A TLS echo server on anyio with private-key offload.

    asyncssl cert --cert-out cert.pem --key-out key.pem     # a test certificate
    python examples/echo_server_anyio.py --cert cert.pem --key key.pem [--port 8443]

Without --cert it makes a self-signed certificate (``--write-cert`` saves it
for clients' ``--cafile``); ``--port 0`` takes any free port and prints it.  Try it with
``openssl s_client -connect 127.0.0.1:8443`` or ``examples/client_anyio.py``.
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
from pathlib import Path

import anyio
from anyio.streams.tls import TLSAttribute

from anyio_asyncssl import Offload, TLSContext
from anyio_asyncssl.selfsigned import generate_self_signed
from anyio_asyncssl.stream import AsyncTLSAttribute, AsyncTLSListener, AsyncTLSStream


async def echo(stream: AsyncTLSStream) -> None:
    peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
    print(f"{peer}: {stream.extra(TLSAttribute.tls_version)}, "
          f"handshake pauses: {stream.extra(AsyncTLSAttribute.pauses)}")
    try:
        async with stream:   # closing it sends close_notify: the client may be gone
            while True:
                await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass


async def main(args: argparse.Namespace) -> None:
    offload = Offload()  # one worker thread per CPU signs for the handshakes
    context = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=offload)
    with tempfile.TemporaryDirectory() as tmp:
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
        else:
            cert, key = generate_self_signed("localhost")
            (Path(tmp) / "server.pem").write_bytes(key + cert)
            context.load_cert_chain(Path(tmp) / "server.pem")
            if args.write_cert:
                Path(args.write_cert).write_bytes(cert)
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=args.port)
        listener = AsyncTLSListener(tcp, context)
        print(f"listening on 127.0.0.1:{tcp.extra(anyio.abc.SocketAttribute.local_port)}",
              flush=True)
        await listener.serve(echo)


def is_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C, perhaps inside the exception groups trio wraps it in."""
    subs = getattr(exc, "exceptions", ())
    return isinstance(exc, KeyboardInterrupt) or (bool(subs) and all(map(is_ctrl_c, subs)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--write-cert", help="save the generated certificate here")
    p.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    a = p.parse_args()
    try:
        anyio.run(main, a, backend=a.backend)
    except BaseException as exc:
        if not is_ctrl_c(exc):
            raise
