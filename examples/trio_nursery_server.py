"""A TLS echo server on a trio nursery: ``TrioTLSListener`` with ``trio.serve_listeners``.

    asyncssl cert --cert-out cert.pem --key-out key.pem     # a test certificate
    python examples/trio_nursery_server.py --cert cert.pem --key key.pem [--port 8443]

Without --cert it makes a self-signed certificate (``--write-cert`` saves it
for clients' ``--cafile``).  Each connection is a task in the nursery; a
client that hangs up without close_notify ends only its own task.  Prints
``listening on HOST:PORT`` with the port it really got (``--port 0``).
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
from pathlib import Path

import trio

from anyio_asyncssl import Offload, TLSContext, generate_self_signed
from anyio_asyncssl.trio import TrioTLSListener, TrioTLSStream


async def echo(stream: TrioTLSStream[trio.SocketStream]) -> None:
    async with stream:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass   # the client hung up without close_notify, or its handshake failed


async def main(context: TLSContext, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    host, bound = listeners[0].socket.getsockname()[:2]
    print(f"listening on {host}:{bound}", flush=True)
    await trio.serve_listeners(echo, [TrioTLSListener(lst, context) for lst in listeners])


def make_context(cert: str | None, key: str | None, write_cert: str | None,
                 tmp: Path) -> TLSContext:
    context = TLSContext(ssl.PROTOCOL_TLS_SERVER, offload=Offload())  # workers sign
    if cert:
        context.load_cert_chain(cert, key)
    else:
        cert_pem, key_pem = generate_self_signed("localhost")
        (tmp / "server.pem").write_bytes(key_pem + cert_pem)
        context.load_cert_chain(tmp / "server.pem")
        if write_cert:
            Path(write_cert).write_bytes(cert_pem)
    return context


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
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(a.cert, a.key, a.write_cert, Path(tmp))
        try:
            trio.run(main, ctx, a.port)
        except BaseException as exc:
            if not is_ctrl_c(exc):
                raise
