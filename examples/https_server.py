"""A minimal HTTPS server on anyio: one page, HTTP/1.1 keep-alive, offload on.

    python examples/https_server.py [--port 8443] [--backend trio] [--write-cert ca.pem]
    curl --cacert ca.pem https://localhost:8443/

A real application would put an HTTP library (h11, or a server such as
hypercorn) on the stream; this one parses just enough HTTP to answer GET.
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
from pathlib import Path

import anyio
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute

from anyio_asyncssl import Offload, TLSContext, generate_self_signed
from anyio_asyncssl.stream import AsyncTLSListener, AsyncTLSStream


async def handle(stream: AsyncTLSStream) -> None:
    buffer = b""
    try:
        async with stream:   # closing it sends close_notify: the client may be gone
            while True:
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive()
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                close = b"connection: close" in head.lower()
                body = (f"<h1>hello over {stream.extra(TLSAttribute.tls_version)}</h1>"
                        f"<p>{request_line}</p>\n").encode()
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                    + f"Content-Length: {len(body)}\r\n".encode()
                    + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)
                if close:
                    return
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass   # the client is done (with or without close_notify)


async def main(context: TLSContext, port: int) -> None:
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    print(f"listening on 127.0.0.1:{tcp.extra(SocketAttribute.local_port)}", flush=True)
    await AsyncTLSListener(tcp, context).serve(handle)


def is_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C, perhaps inside the exception groups trio wraps it in."""
    subs = getattr(exc, "exceptions", ())
    return isinstance(exc, KeyboardInterrupt) or (bool(subs) and all(map(is_ctrl_c, subs)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    p.add_argument("--write-cert", help="save the generated certificate here")
    a = p.parse_args()
    ctx = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=Offload())
    ctx.set_alpn_protocols(["http/1.1"])
    cert, key = generate_self_signed("localhost")
    if a.write_cert:
        Path(a.write_cert).write_bytes(cert)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "server.pem").write_bytes(key + cert)
        ctx.load_cert_chain(Path(tmp) / "server.pem")
    try:
        anyio.run(main, ctx, a.port, backend=a.backend)
    except BaseException as exc:
        if not is_ctrl_c(exc):
            raise
